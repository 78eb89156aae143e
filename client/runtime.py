"""Per-process caches of a node: the model and each node's prepared data live across messages.

In simulation one Ray worker serves many virtual nodes and many rounds, so the
base model is loaded once per worker and shared (every round overwrites the
exchanged adapter tensors first), and each node's tokenized data is prepared once.
"""

from __future__ import annotations

import gc
import os
from collections import OrderedDict
from pathlib import Path

from fedtune.client.node_config import NodeSettings
from fedtune.common.training import builder
from fedtune.common.training.config import JobConfig
from fedtune.common.training.federated_data import node_splits
from fedtune.common.training.model import LoraModel
from fedtune.common.training.node import Node, prepare

SIM_CACHE_ENV = "FEDTUNE_SIM_CACHE"  # a simulation's private temporary directory for its workers' caches
_MODELS: dict[tuple, LoraModel] = {}
_NODES: OrderedDict[tuple[JobConfig, NodeSettings], Node] = OrderedDict()  # keyed by the parsed (frozen) values
MAX_NODES = 64
MAX_PARSED_SETTINGS = 256  # (job, node settings) pairs a ClientApp keeps parsed: one Ray worker serves many virtual nodes


def _model_key(cfg: JobConfig, labels: list[str]) -> tuple:
    """Everything ``builder.build_model`` reads (a job differing only in pooling or precision once got the
    previous job's model)."""
    return (cfg.model.path, cfg.model.task, cfg.model.pooling, tuple(labels), cfg.lora, cfg.train.device,
            cfg.train.precision)


def shared_model(cfg: JobConfig, labels: list[str]) -> LoraModel:
    key = _model_key(cfg, labels)
    if key not in _MODELS:
        # one job at a time per process: drop the other jobs' model and the prepared nodes that hold it
        # (a server alternating jobs would otherwise keep up to MAX_NODES models alive: found by the
        # property-based adversary, which ran a node out of memory)
        _MODELS.clear()
        _NODES.clear()
        gc.collect()
        _MODELS[key] = builder.build_model(cfg, labels)
    return _MODELS[key]


def get_node(cfg: JobConfig, ns: NodeSettings) -> Node:
    """The prepared Node for this job and node, built on first use."""
    key = (cfg, ns)
    if key in _NODES:
        _NODES.move_to_end(key)
        return _NODES[key]
    # a simulated node trains on its partition of the job's data; an organization's node reads its own file (its
    # own columns already applied by NodeSettings.apply) in prepare, through the builder like everything else
    splits = node_splits(cfg, *ns.partition) if ns.partition is not None else None
    # a deployed node caches in its own state directory (a fresh process per message); a simulated one in the
    # simulation's private temporary directory its Ray workers share (never the run directory)
    sim_cache = os.environ.get(SIM_CACHE_ENV)
    node = prepare(cfg, ns.policy, state_dir=ns.state_dir, data_path=None if splits else str(ns.data_path),
                   splits=splits, model=lambda labels: shared_model(cfg, labels),
                   cache_dir=ns.state_dir / "cache" if ns.partition is None else (Path(sim_cache) if sim_cache else None))
    _NODES[key] = node
    while len(_NODES) > MAX_NODES:
        _NODES.popitem(last=False)
    return node
