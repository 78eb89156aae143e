"""What one node does for a job: prepare model + data, train a round privately, evaluate.

This is the API the local command and the Flower ClientApp both call; it has
no Flower import. The order inside :func:`train_round` is the privacy
contract: check the budget, train, write the ledger (fsync'd), and only then
pack the weights that leave the node.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from common import adapter, data, privacy
from common.config import JobConfig
from common.evaluate import evaluate
from common.ledger import PrivacyLedger
from common.model import LoraModel, build_lora_model, set_threads
from common.train import ProgressFn, TrainStats, make_optimizer, train_steps

log = logging.getLogger(__name__)


@dataclass
class Node:
    """A node prepared for one job: model, tokenized splits, step plan, noise and ledger."""

    cfg: JobConfig
    lora: LoraModel
    splits: data.Splits
    train_set: TensorDataset
    val_set: TensorDataset
    test_set: TensorDataset
    plan: privacy.StepPlan
    noise_multiplier: float  # 0.0 when DP is off
    ledger: PrivacyLedger
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    arrays: dict[str, np.ndarray]  # the exchanged adapter tensors after training
    stats: TrainStats
    num_examples: int  # training records on this node (FedAvg weight)
    epsilon_spent: float  # total spent on this dataset after this round (ledger)
    noise_multiplier: float
    sample_rate: float
    delta: float


def prepare(cfg: JobConfig, *, state_dir: str | Path, max_epsilon: float, delta: float = 0.0,
            data_path: str | None = None, model: LoraModel | None = None, for_training: bool = True,
            splits: data.Splits | None = None, cache_dir: str | Path | None = None) -> Node:
    """Load data and model for ``cfg`` on this node and work out its DP parameters.

    Args:
        cfg: the job configuration.
        state_dir: this node's state directory (holds the privacy ledger).
        max_epsilon: this node's privacy ceiling (its owner's choice, not the job's).
        delta: this node's delta (0 = automatic from its record count).
        data_path: overrides ``cfg.data.path`` (a node's own file).
        model: reuse an already built model (tests, simulations).
        for_training: False to only evaluate (no size check, no noise calibration).
        splits: already loaded records (simulated nodes get a partition); skips reading files.
        cache_dir: keep tokenized data and the calibrated noise here, so a fresh process per
            message (Flower's subprocess isolation) does not redo them.

    Raises:
        DataError, ModelError, PrivacyError, LedgerError: with what to fix.
    """
    set_threads(cfg.train.threads)
    d = cfg.data
    splits = splits or data.load_splits(path=data_path if data_path is not None else d.path, text_column=d.text_column,
                              label_column=d.label_column, labels=d.label_list, task=cfg.model.task,
                              val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed,
                              max_records=d.max_records)
    if for_training:
        data.check_trainable_size(len(splits.train), cfg.train.batch_size, splits.train.source)
    if model is None:
        lc = cfg.lora
        model = build_lora_model(model_path=cfg.model.path, task=cfg.model.task, labels=splits.labels, r=lc.r,
                                 alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_module_list,
                                 ffa=lc.ffa, seed=lc.seed)
    tok = model.tokenizer
    key = _cache_key(splits.dataset_id, cfg.data.__dict__, str(model.base_path), cfg.model.max_length,
                     cfg.model.task, splits.labels, len(splits.train), len(splits.val), len(splits.test))
    sets = _cached_tokens(cache_dir, key) if cache_dir else None
    if sets is None:
        sets = [data.tokenize(s, tok, label_set=splits.labels, max_length=cfg.model.max_length)
                for s in (splits.train, splits.val, splits.test)]
        if cache_dir:
            _store_tokens(cache_dir, key, sets)
    n_total = len(splits.train) + len(splits.val) + len(splits.test)
    ledger = PrivacyLedger(state_dir, dataset_id=splits.dataset_id, n_records=n_total, delta=delta,
                           max_epsilon=max_epsilon, accountant=cfg.privacy.accountant)
    t = cfg.train
    plan = privacy.plan_steps(n_train=len(splits.train), batch_size=t.batch_size, local_epochs=t.local_epochs,
                              local_steps=t.local_steps, rounds=t.rounds)
    noise = 0.0
    if for_training and cfg.privacy.enabled:
        target = min(cfg.privacy.target_epsilon, max_epsilon)  # the job may ask less, never more than the node
        nkey = _cache_key(target, ledger.delta, plan.__dict__, cfg.privacy.accountant)
        noise = cfg.privacy.noise_multiplier or _cached_noise(cache_dir, nkey) or privacy.calibrate_noise(
            target_epsilon=target, delta=ledger.delta, plan=plan, kind=cfg.privacy.accountant)
        if cache_dir and not cfg.privacy.noise_multiplier:
            _store_noise(cache_dir, nkey, noise)
    return Node(cfg=cfg, lora=model, splits=splits, train_set=sets[0], val_set=sets[1], test_set=sets[2],
                plan=plan, noise_multiplier=noise, ledger=ledger)


def train_round(node: Node, *, job: str, round: int, initial: Mapping[str, np.ndarray] | None = None,
                progress: ProgressFn | None = None) -> RoundResult:
    """Train one round on this node and return the adapter update.

    Refuses (BudgetExceededError) before training if the round would pass the
    node's ceiling. The ledger entry is durable before this returns weights.
    """
    cfg, model = node.cfg, node.lora.model
    if initial is not None:
        adapter.unpack(model, initial, ffa=node.lora.ffa)
    steps, q = node.plan.steps_per_round, node.plan.sample_rate
    node.ledger.check(noise_multiplier=node.noise_multiplier, sample_rate=q, steps=steps)
    torch.manual_seed(cfg.train.seed * 1000003 + round)
    loader = DataLoader(node.train_set, batch_size=cfg.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.train.seed + round))
    optimizer = make_optimizer(model, name=cfg.train.optimizer, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()  # Opacus refuses a model in eval mode
    if cfg.privacy.enabled:
        p = cfg.privacy
        dp_model, dp_opt, dp_loader, engine = privacy.make_private(
            model=model, optimizer=optimizer, loader=loader, noise_multiplier=node.noise_multiplier,
            max_grad_norm=p.max_grad_norm, grad_sample_mode=p.grad_sample_mode, poisson_sampling=p.poisson_sampling,
            kind=p.accountant)
        try:
            stats = train_steps(dp_model, dp_loader, dp_opt, steps=steps, task=cfg.model.task, progress=progress)
        finally:
            privacy.release(dp_model)
        history = engine.accountant.history
        taken = sum(n for _, _, n in history)
        q_used = history[0][1] if history else q
        entry = node.ledger.record(job=job, round=round, noise_multiplier=node.noise_multiplier,
                                   sample_rate=q_used, steps=taken)
    else:
        stats = train_steps(model, loader, optimizer, steps=steps, task=cfg.model.task, progress=progress)
        entry = node.ledger.record(job=job, round=round, noise_multiplier=0.0, sample_rate=q, steps=steps)
    arrays = adapter.pack(model, ffa=node.lora.ffa)
    return RoundResult(arrays=arrays, stats=stats, num_examples=len(node.train_set),
                       epsilon_spent=entry.epsilon_after, noise_multiplier=node.noise_multiplier,
                       sample_rate=entry.sample_rate, delta=node.ledger.delta)


def evaluate_split(node: Node, split: str = "test") -> dict:
    """Metrics of the node's current model on its ``train``/``val``/``test`` split."""
    ds = {"train": node.train_set, "val": node.val_set, "test": node.test_set}[split]
    return evaluate(node.lora.model, ds, task=node.cfg.model.task, labels=node.splits.labels,
                    batch_size=node.cfg.train.eval_batch_size)


def planned_epsilon(node: Node) -> float:
    """Epsilon this job alone spends over all its planned rounds (inf without DP)."""
    if node.noise_multiplier <= 0:
        return math.inf
    return privacy.epsilon([(node.noise_multiplier, node.plan.sample_rate, node.plan.total_steps)],
                           delta=node.ledger.delta, kind=node.ledger.accountant)


# -- a node's disk cache (derived data only: safe to delete) -----------------------------------
def _cache_key(*parts) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cached_tokens(cache_dir, key: str) -> list[TensorDataset] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(cache_dir) / f"tokens-{key}.safetensors"
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError):
        return None  # a damaged cache is rebuilt
    names = sorted({k.split("/")[0] for k in t})
    return [TensorDataset(*[t[f"{n}/{i}"] for i in range(sum(1 for k in t if k.startswith(n + "/")))])
            for n in names]


def _store_tokens(cache_dir, key: str, sets: list[TensorDataset]) -> None:
    from safetensors.torch import save_file

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}/{i}": t.contiguous() for n, ds in zip(("0train", "1val", "2test"), sets)
               for i, t in enumerate(ds.tensors)}
    tmp = Path(cache_dir) / f"tokens-{key}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(Path(cache_dir) / f"tokens-{key}.safetensors")


def _cached_noise(cache_dir, key: str) -> float | None:
    import json

    path = Path(cache_dir) / f"noise-{key}.json" if cache_dir else None
    try:
        return float(json.loads(path.read_text())["noise_multiplier"]) if path and path.is_file() else None
    except (OSError, ValueError, KeyError):
        return None


def _store_noise(cache_dir, key: str, noise: float) -> None:
    import json

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    (Path(cache_dir) / f"noise-{key}.json").write_text(json.dumps({"noise_multiplier": noise}))
