"""The records of a simulated federation: one global split, the train pool partitioned across nodes.

The server evaluates on the global validation/test splits; node ``i`` trains on
partition ``i`` of the global train split and keeps ``sim.local-test-fraction``
of it for local evaluation. Everything is a pure function of the config, so the
server and every virtual node compute the same partitions independently.
"""

from __future__ import annotations

import functools
import math

from fedtune.common.training import builder, data
from fedtune.common.training.config import JobConfig, ModelConfig, TrainConfig
from fedtune.common.training.partition import partition


def global_splits(cfg: JobConfig) -> data.Splits:
    return _global_splits(_data_key(cfg))


def _data_key(cfg: JobConfig) -> JobConfig:
    """The part of the job the records and partitions depend on, as a (hashable, already valid) config: jobs that
    differ only in training settings (tune's trials) share them."""
    return JobConfig(data=cfg.data, model=ModelConfig(task=cfg.model.task), sim=cfg.sim,
                     train=TrainConfig(batch_size=cfg.train.batch_size))


@functools.lru_cache(maxsize=4)
def _global_splits(key: JobConfig) -> data.Splits:
    return builder.load_records(key)


@functools.lru_cache(maxsize=4)
def _partitions(key: JobConfig, num_nodes: int) -> list[list[int]]:
    cfg = key
    s = cfg.sim
    pool = _global_splits(key).train
    # classification partitions by label; instruction data by its group (BBC headlines: the topic), if any
    return partition(pool.labels or pool.groups or [""] * len(pool), num_partitions=num_nodes, kind=s.partitioner, alpha=s.alpha,
                     labels_per_node=s.labels_per_node, seed=s.seed, min_size=min_partition_size(cfg))


def min_partition_size(cfg: JobConfig) -> int:
    """``sim.min-partition-size``, or by default enough records for one training batch after the local test split."""
    if cfg.sim.min_partition_size:
        return max(2, cfg.sim.min_partition_size)
    return max(2, math.ceil(cfg.train.batch_size / (1.0 - cfg.sim.local_test_fraction)) + 1)


def node_splits(cfg: JobConfig, node_index: int, num_nodes: int) -> data.Splits:
    """Node ``node_index``'s own records: train and local test from its partition (no validation split)."""
    key = _data_key(cfg)
    g = _global_splits(key)
    part = g.train.subset(_partitions(key, num_nodes)[node_index])
    train, _, test = data.split(part, val_fraction=0.0, test_fraction=cfg.sim.local_test_fraction,
                                seed=cfg.sim.seed + node_index)
    empty = part.subset([])
    return data.Splits(train=train, val=empty, test=test, labels=g.labels, fingerprint=part.fingerprint(),
                       n_source=len(part), train_share=1.0 - cfg.sim.local_test_fraction)


def partition_sizes(cfg: JobConfig, num_nodes: int) -> list[int]:
    return [len(p) for p in _partitions(_data_key(cfg), num_nodes)]
