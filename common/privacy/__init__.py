"""Privacy accounting: how much a node has released about each data source, and the ceiling.

``accounting`` wraps the well-kept accountants (Google's PLD accountant from ``dp-accounting``, Opacus'
RDP) behind ``epsilon`` / ``calibrate`` and attaches Opacus to a model; ``ledger`` is the node's durable
record per data source (reserve, settle, cancel under a file lock), the thing that enforces the ceiling.
"""
