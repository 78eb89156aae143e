"""The local recipe: one organization trains and evaluates on its own file, on its own machine.

What ``fedtune local`` and ``fedtune evaluate`` run, callable from tests and notebooks. Training
here is a release like any other: it is charged to the data source's ledger under the node's
ceiling (``max_epsilon``), exactly as a federated round would be.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.privacy.accounting import DEFAULT_DELTA, DP_OFF_WARNING
from fedtune.common.privacy.ledger import DEFAULT_SOURCE
from fedtune.common.training import adapter
from fedtune.common.training.config import JobConfig
from fedtune.common.training.node import NodePolicy, evaluate_split, job_plan, planned_epsilon, prepare, train_round
from fedtune.common.training.model import resolve_device
from fedtune.common.training.train import ProgressFn



def train_locally(cfg: JobConfig, *, max_epsilon: float, state_dir: str | Path, out: str | Path | None = None,
                  source: str | None = None, shared_content_ok: bool = False,
                  init_adapter: str | Path | None = None,
                  say: Callable[[str], None] = print, warn: Callable[[str], None] = print,
                  progress: Callable[[str], ProgressFn] | None = None) -> dict:
    """Train ``cfg.train.rounds`` rounds on this node's data and save adapter, config and metrics in ``out``.

    Returns the summary written to ``out/metrics.json`` (plus ``out``).

    Raises:
        FedtuneError: DP off under a finite ceiling, bad data/model/settings, a spent budget.
    """
    if not cfg.privacy.enabled and math.isfinite(max_epsilon):
        raise FedtuneError(
            "privacy.enabled=false would release a model with no privacy guarantee, but this node's ceiling is "
            f"epsilon {max_epsilon:g}",
            "pass --max-epsilon inf to allow non-private training on this data (the ledger then records an "
            "infinite spend for it), or keep DP on")
    if not cfg.privacy.enabled:
        warn(f"WARNING: {DP_OFF_WARNING}")
    resolve_device(cfg.train.device)  # a setting this machine cannot honour fails before any record is read
    t0 = time.perf_counter()
    source = source or DEFAULT_SOURCE  # one budget per state directory unless the organization names sources
    policy = NodePolicy(source=source, max_epsilon=max_epsilon, delta=cfg.privacy.delta or DEFAULT_DELTA,
                        accountant=cfg.privacy.accountant, evaluate=False, shared_content_ok=shared_content_ok)
    say(f"fedtune local: loading data ({cfg.data.path or 'BBC News (packaged)'}) and model "
        f"({cfg.model.path or 'all-MiniLM-L6-v2 (packaged)'}) ...")
    node = prepare(cfg, policy, state_dir=state_dir)
    job = f"local-{time.strftime('%Y%m%d-%H%M%S')}"
    lm = node.lora
    say(f"  records: train {len(node.train_set)}, val {len(node.val_set)}, test {len(node.test_set)}; "
        f"labels: {', '.join(node.splits.labels) or '(causal LM)'}")
    say(f"  {cfg.lora.describe()}: {lm.trainable_parameters():,} trainable of "
        f"{lm.total_parameters():,} parameters")
    if cfg.privacy.enabled:
        spent = node.ledger.spent()
        jp = job_plan(node, job, federated=False, warn=lambda m: warn(f"WARNING: {m}"))
        say(f"  DP-SGD: noise multiplier {jp.noise_multiplier:.3f}, clip {cfg.privacy.max_grad_norm}, "
            f"sample rate {node.plan.sample_rate:.4f}, {node.plan.total_steps} steps -> epsilon "
            f"{planned_epsilon(node, job, federated=False):.2f} at delta {policy.delta:.2g} ({policy.accountant})")
        say(f"  ledger of data source {source!r}: {node.ledger.path} (spent so far {spent:.3f} of ceiling "
            f"{max_epsilon:g})")
    if init_adapter:
        adapter.load_adapter_dir(lm.model, init_adapter)
        say(f"  starting from adapter {init_adapter}")
    out = Path(out or Path("runs") / job)
    result = None
    for rnd in range(1, cfg.train.rounds + 1):
        result = train_round(node, job=job, round=rnd, federated=False,
                             progress=progress(f"round {rnd}") if progress else None)
    assert result is not None
    say(f"  trained {result.stats.steps * cfg.train.rounds} steps in {time.perf_counter() - t0:.0f}s; "
        f"epsilon spent on this data source: {result.epsilon_spent:.3f} (delta {result.delta:.2g})")
    metrics = {"val": evaluate_split(node, "val"), "test": evaluate_split(node, "test")}
    adapter.save_adapter(lm.model, out / "adapter")
    (out / "config.json").write_text(json.dumps(cfg.to_flat(), indent=2) + "\n")
    summary = {"job": job, "metrics": metrics, "privacy": {**node.ledger.summary(), "dp": cfg.privacy.enabled},
               "seconds": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return {**summary, "out": str(out)}


def evaluate_locally(cfg: JobConfig, adapter_dir: str | Path, split: str = "test") -> dict:
    """Exact metrics of a saved adapter on this node's own split: the organization's own look, nothing released."""
    adapter.read_adapter_file(adapter_dir)  # fail fast on a missing or corrupt file, before loading the model
    with tempfile.TemporaryDirectory() as scratch:
        policy = NodePolicy(source="local evaluation", max_epsilon=math.inf)
        node = prepare(cfg, policy, state_dir=scratch, for_training=False)
        adapter.load_adapter_dir(node.lora.model, adapter_dir)
        return evaluate_split(node, split)
