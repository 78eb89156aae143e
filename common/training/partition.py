"""Splitting one dataset across simulated organizations (Flower Datasets' partitioners).

``iid`` shuffles then shards evenly; ``dirichlet`` draws each node's label mix
from Dirichlet(alpha) (small alpha = skewed); ``label`` gives each node only
``labels_per_node`` labels (pathological label skew). Partitions are lists of
record indices and depend only on the inputs and the seed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
from fedtune.common.errors import DataError

log = logging.getLogger(__name__)


def partition(labels: Sequence[str], *, num_partitions: int, kind: str, alpha: float = 1.0,
              labels_per_node: int = 2, seed: int = 0, min_size: int = 2) -> list[list[int]]:
    """Indices of each partition; together they cover every record exactly once (``label`` may drop none).

    Raises:
        DataError: when the records cannot be split that way (too few records or labels).
    """
    import datasets
    from flwr_datasets.partitioner import IidPartitioner, PathologicalPartitioner

    datasets.disable_progress_bars()
    n = len(labels)
    if num_partitions < 1 or n < num_partitions * min_size:
        raise DataError(f"cannot split {n} records into {num_partitions} partitions of at least {min_size}",
                        "use fewer nodes (fed.num-nodes), more records, or a smaller train.batch-size / "
                        "sim.min-partition-size")
    if kind != "iid" and not any(labels):
        raise DataError(f"sim.partitioner={kind} needs labels, and this data has none (causal LM?)",
                        "use sim.partitioner=iid")
    order = np.random.default_rng(seed).permutation(n)
    table = datasets.Dataset.from_dict({"idx": order.tolist(), "label": [labels[i] for i in order]})
    if kind == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif kind == "dirichlet":
        return _dirichlet(table, n, num_partitions, alpha, min_size, seed)
    elif kind == "label":
        n_labels = len(set(labels))
        if labels_per_node > n_labels:
            raise DataError(f"sim.labels-per-node={labels_per_node} but the data has only {n_labels} labels",
                            f"set sim.labels-per-node to at most {n_labels}")
        part = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=labels_per_node,
                                       class_assignment_mode="first-deterministic", shuffle=True, seed=seed)
    else:
        raise DataError(f"unknown partitioner {kind!r}", "use sim.partitioner=iid, dirichlet or label")
    part.dataset = table
    try:
        with warnings.catch_warnings():  # Flower Datasets warns at each resampling towards min_size; we report failure
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            parts = [sorted(int(i) for i in part.load_partition(p)["idx"]) for p in range(num_partitions)]
    except ValueError as e:
        raise DataError(f"cannot partition {n} records into {num_partitions} {kind} partitions: {e}",
                        "raise sim.alpha, use fewer nodes, or use sim.partitioner=iid") from None
    small = [i for i, p in enumerate(parts) if len(p) < min_size]
    if small:
        raise DataError(f"{kind} partitioning left node(s) {small[:5]} with fewer than {min_size} records "
                        "(one training batch after the local test split)",
                        "raise sim.alpha, use fewer nodes, change sim.seed, or lower train.batch-size or "
                        "sim.min-partition-size")
    return parts


DIRICHLET_DRAWS = 20


def _dirichlet(table, n: int, num_partitions: int, alpha: float, min_size: int, seed: int) -> list[list[int]]:
    """Dirichlet partitions with every node holding at least ``min_size`` records. Flower Datasets redraws up to 10
    times from one seed; a draw that still leaves a node short is redrawn from the next seed derived from
    ``seed`` (still reproducible), up to DIRICHLET_DRAWS seeds: skewed labels with few records per node (a binary
    set with an 18% minority, 5 nodes needing 144 records each) fail one seed's 10 tries about 1 time in 5."""
    from flwr_datasets.partitioner import DirichletPartitioner

    last = None
    for draw in range(DIRICHLET_DRAWS):
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                    min_partition_size=min_size, self_balancing=False, shuffle=True,
                                    seed=seed if draw == 0 else seed * 1_000_003 + draw)
        part.dataset = table
        try:
            with warnings.catch_warnings():  # Flower Datasets warns at each resampling towards min_size
                warnings.filterwarnings("ignore", message="The specified min_partition_size")
                parts = [sorted(int(i) for i in part.load_partition(p)["idx"]) for p in range(num_partitions)]
        except ValueError as e:
            last = e
            continue
        if all(len(p) >= min_size for p in parts):
            return parts
    raise DataError(f"cannot partition {n} records into {num_partitions} dirichlet partitions of at least "
                    f"{min_size} records (sim.alpha={alpha:g}; {DIRICHLET_DRAWS} seeds of 10 draws each)"
                    + (f": {last}" if last else ""),
                    "raise sim.alpha, use fewer nodes, use sim.partitioner=iid, or lower train.batch-size or "
                    "sim.min-partition-size")

