"""The Flower-free core shared by server, client and simulations, one package per product area.

``training`` (config, data, model, adapter, a node's private round), ``privacy`` (accountants and the
per-source ledger), ``secagg`` (the secure-aggregation protocol and its message codec), ``serving``
(export, model card, registry, inference, drift) and ``operations`` (run directory, monitoring, keys,
atomic writes). ``errors`` is the one error hierarchy. Nothing in this package imports Flower (a test
enforces it); see docs/architecture.md for a round followed through these files.
"""
