"""Operations: the files administrators read and the keys a federation runs on.

``rundir`` (the run directory: run.json, rounds.jsonl, checkpoints, summary), ``monitoring`` (run views
and per-node privacy figures, the one function summary, export, status and the dashboard use),
``keys`` (CA, SuperLink certificate and SuperNode key pairs) and ``atomic`` (the one
write-to-temp-fsync-rename helper).
"""
