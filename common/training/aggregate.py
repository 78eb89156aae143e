"""FedAvg arithmetic over adapter updates (pure numpy; the secure-aggregation seam).

Nodes send *updates* (trained minus received adapter tensors). The server's new
adapter is ``global + sum_i(w_i * update_i) / sum_i(w_i)``. Weighted FedAvg uses
each node's training records rounded up to whole batches as ``w_i`` (:func:`batch_weight`, the
one weight rule: the node reports it, :func:`node_weight`, which lives in
:mod:`fedtune.common.secagg.limits`, turns it into ``w_i``); uniform uses 1. With secure
aggregation the server only ever sees the two sums, which is why aggregation is
written in terms of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from fedtune.common.secagg.limits import node_weight as node_weight  # the one weight rule, owned by limits

Arrays = Mapping[str, np.ndarray]


def batch_weight(n_train: int, batch_size: int) -> int:
    """The node weight rule: training records rounded up to whole batches.

    It carries no more than the Poisson sampling rate (1 / ceil(N / B)) that nodes report anyway,
    so a node's exact record count never leaves it."""
    return math.ceil(n_train / batch_size) * batch_size


def update(trained: Arrays, received: Arrays) -> dict[str, np.ndarray]:
    """What a node sends: its trained tensors minus the ones it received."""
    return {k: (np.asarray(trained[k], np.float32) - np.asarray(received[k], np.float32)) for k in received}


def weighted_sum(updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_i w_i * update_i, key by key (float64 accumulation)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = list(updates[0])
    out = {k: np.zeros(np.shape(updates[0][k]), np.float64) for k in keys}
    for u, w in zip(updates, weights, strict=True):
        if list(u) != keys:
            raise ValueError("updates have different tensor names")
        for k in keys:
            out[k] += float(w) * np.asarray(u[k], np.float64)
    return out


def apply(global_arrays: Arrays, summed: Arrays, total_weight: float) -> dict[str, np.ndarray]:
    """The new global adapter: global + summed / total_weight (kept float32)."""
    if total_weight <= 0:
        raise ValueError("total weight must be positive")
    return {k: (np.asarray(global_arrays[k], np.float64) + np.asarray(summed[k], np.float64) / total_weight)
            .astype(np.float32) for k in global_arrays}


def fedavg(global_arrays: Arrays, updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Plain FedAvg: apply the weighted mean of ``updates`` to ``global_arrays``."""
    return apply(global_arrays, weighted_sum(updates, weights), float(sum(weights)))
