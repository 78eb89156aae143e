"""Partitioners: sizes add up, Dirichlet with small alpha is skewed, seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.common.errors import DataError
from fedtune.common.training.partition import partition
from helpers import LORA_RECIPE

LABELS = [lab for lab in "abcde" for _ in range(200)]  # 1,000 records, 5 balanced labels


def label_counts(labels, parts, label_set) -> list[dict[str, int]]:
    """Per partition, how many records of each label."""
    return [{lab: sum(1 for i in p if labels[i] == lab) for lab in label_set} for p in parts]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "label"])
def test_partitions_cover_every_record_once(kind):
    parts = partition(LABELS, num_partitions=7, kind=kind, alpha=1.0, labels_per_node=2, seed=3)
    flat = [i for p in parts for i in p]
    assert len(parts) == 7 and sorted(flat) == list(range(len(LABELS)))


def test_seeds_reproduce_and_differ():
    a = partition(LABELS, num_partitions=5, kind="dirichlet", alpha=0.5, seed=1)
    b = partition(LABELS, num_partitions=5, kind="dirichlet", alpha=0.5, seed=1)
    c = partition(LABELS, num_partitions=5, kind="dirichlet", alpha=0.5, seed=2)
    assert a == b and a != c


def _skew(parts) -> float:
    """Mean over partitions of the largest label's share (0.2 = balanced, 1.0 = one label)."""
    counts = label_counts(LABELS, parts, list("abcde"))
    return float(np.mean([max(c.values()) / max(1, sum(c.values())) for c in counts]))


def test_small_alpha_dirichlet_is_skewed_and_iid_is_not():
    iid = partition(LABELS, num_partitions=5, kind="iid", seed=0)
    skewed = partition(LABELS, num_partitions=5, kind="dirichlet", alpha=0.1, seed=0)
    mild = partition(LABELS, num_partitions=5, kind="dirichlet", alpha=100.0, seed=0)
    assert _skew(iid) < 0.3
    assert _skew(mild) < 0.35
    assert _skew(skewed) > 0.45 and _skew(skewed) > 2 * _skew(iid)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1


def test_label_skew_gives_each_node_its_labels_only():
    parts = partition(LABELS, num_partitions=5, kind="label", labels_per_node=2, seed=0)
    for c in label_counts(LABELS, parts, list("abcde")):
        assert sum(1 for v in c.values() if v) <= 2


def test_impossible_partitioning_is_a_clear_error():
    with pytest.raises(DataError, match="fewer nodes"):
        partition(LABELS[:10], num_partitions=8, kind="iid")
    with pytest.raises(DataError, match="labels-per-node"):
        partition(LABELS, num_partitions=5, kind="label", labels_per_node=9)


def test_default_minimum_partition_gives_every_node_one_batch(tmp_path):
    """Dirichlet with small alpha used to leave a node fewer records than one batch; the default minimum
    (one batch after the local test split) resamples or refuses with the settings to change."""
    from fedtune.common.training.config import load_config
    from fedtune.common.training.federated_data import min_partition_size, node_splits, partition_sizes
    from helpers import write_easy_csv

    csv = write_easy_csv(tmp_path / "d.csv", n=400)
    base = {**LORA_RECIPE, "data.path": str(csv), "data.labels": "sport,finance", "fed.num-nodes": 4, "fed.min-nodes": 3, "sim.partitioner": "dirichlet",
            "sim.alpha": 0.3, "train.batch-size": 16}
    cfg = load_config(base)
    assert min_partition_size(cfg) == 21  # ceil(16 / 0.8) + 1
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # resampling is ours to report, not a warning per attempt
        warnings.simplefilter("always")
        assert min(partition_sizes(cfg, 4)) >= 21
        assert min(partition_sizes(load_config({**base, "sim.seed": 1}), 4)) >= 21  # resampled (see `loose` below)
    assert not [w for w in caught if "min_partition_size" in str(w.message)]
    assert all(len(node_splits(cfg, i, 4).train) >= 16 for i in range(4))
    loose = load_config({**base, "sim.min-partition-size": 2, "sim.seed": 1})
    assert min(partition_sizes(loose, 4)) < 21  # what the old default allowed on this data
    with pytest.raises(DataError, match="sim.min-partition-size"):
        partition_sizes(load_config({**base, "train.batch-size": 128}), 4)


def test_nodes_too_small_to_train_are_recorded_and_the_table_is_still_written(tmp_path):
    """A local-only baseline whose nodes cannot train alone used to kill `fedtune baselines` (exit 2, no table)."""
    from fedtune.common.training.config import load_config
    from fedtune.simulations.baselines import local_only
    from fedtune.simulations.report import baseline_table
    from helpers import write_easy_csv

    csv = write_easy_csv(tmp_path / "d.csv", n=80)
    cfg = load_config({**LORA_RECIPE, "data.path": str(csv), "data.labels": "sport,finance", "fed.num-nodes": 3, "fed.min-nodes": 3, "sim.partitioner": "iid",
                       "train.batch-size": 16, "sim.min-partition-size": 2})
    said = []
    row = local_only(cfg, out=said.append)
    assert row["error"] == "no node could train alone" and len(row["skipped"]) == 3
    assert all("fewer than one batch" in s["reason"] for s in row["skipped"])
    table = "\n".join(baseline_table([row]))
    assert "not run: no node could train alone" in table and "node-0 skipped" in table


def test_skewed_binary_labels_with_large_batches_still_give_every_node_a_batch():
    """An 18%-minority binary set, 5 Dirichlet(1.0) nodes each needing 144 records (batch 128): one seed's 10 draws
    fail for seeds 0, 2, 3 and 8 of the first 15; derived seeds are drawn next, reproducibly (the recipes
    benchmark could not partition BBC headlines or SMS spam at batch 128 before)."""
    from fedtune.common.training.partition import partition

    labels = ["tech"] * 262 + ["other"] * 1196
    for seed in (0, 2, 3, 8):
        parts = partition(labels, num_partitions=5, kind="dirichlet", alpha=1.0, seed=seed, min_size=144)
        assert all(len(p) >= 144 for p in parts) and sorted(i for p in parts for i in p) == list(range(len(labels)))
        assert parts == partition(labels, num_partitions=5, kind="dirichlet", alpha=1.0, seed=seed, min_size=144)
    with pytest.raises(DataError, match="20 seeds of 10 draws"):  # impossible: still one clear error
        partition(labels, num_partitions=5, kind="dirichlet", alpha=0.05, seed=0, min_size=250)
