"""Operations: the files administrators read and the keys a federation runs on.

``rundir`` (the run directory: run.json, rounds.jsonl, initial.json, checkpoints, summary; the one reader and
writer), ``records`` (its round lines and summary, typed: ``RoundRecord``, ``RunSummary``), ``monitoring`` (run
views, per-node privacy figures and the run's accountant, the functions summary, export, status and the dashboard
use),
``keys`` (CA, SuperLink certificate and SuperNode key pairs), ``atomic`` (the one
write-to-temp-fsync-rename helper) and ``tracking`` (a run's settings, round figures, report and adapter logged to
MLflow and TensorBoard: ``fed.tracking``, the optional extra ``tracking``).
"""
