"""The training core: from a validated job config to a node's private round and back.

``config`` (the one validated JobConfig), ``builder`` (config -> model and records, the one place
components are built), ``data`` and ``partition`` / ``federated_data`` (records, splits, simulated
partitions), ``model`` and ``adapter`` (the LoRA model and the tensors that travel), ``train`` and
``evaluate`` (steps and metrics), ``node`` (what one node does for a job: plan, train a round
under its ledger, answer an evaluation), ``wire`` (a node's round result as typed values and the
only place its wire keys are spelled) and ``aggregate`` (FedAvg arithmetic and the node weight rule).
No module here imports Flower.
"""
