"""What tests share besides fixtures (those are in conftest.py): small settings, data writers, run-dir makers.

Test modules import from here, never from each other or from conftest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedtune.common.operations.rundir import RoundRecord, RunDir
from fedtune.common.training.config import JobConfig, load_config
from fedtune.simulations.synthetic import EASY_LABELS, FINANCE, SPORT, write_easy_csv

__all__ = ["EASY_LABELS", "FINANCE", "cli_actions", "LORA_RECIPE", "SPORT", "make_run", "round_line", "small_config", "small_settings",
           "write_easy_csv", "write_jsonl"]


# The LoRA recipe that was the default before the defaults became the recommended head-only probe (issue 28):
# tests whose point is training, exchanging or merging LoRA adapters (and that were written against it) say so.
LORA_RECIPE = {"lora.head-only": False, "lora.ffa": False, "model.pooling": "cls", "train.optimizer": "adamw",
               "train.lr": 3e-3, "train.batch-size": 32, "train.rounds": 1, "privacy.max-grad-norm": 1.0,
               "sim.node-max-epsilon": 10.0}


def small_settings(**extra) -> dict:
    """Settings for fast tests on the LoRA recipe: short sequences, small batches, few steps."""
    base = {**LORA_RECIPE, "model.max-length": 24, "train.batch-size": 8, "train.local-steps": 4, "train.eval-batch-size": 32,
            "data.max-records": 120, "train.threads": 2}
    base.update(extra)
    return base


def small_config(**extra) -> JobConfig:
    return load_config(small_settings(**extra))

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def round_line(k, *, status="ok", per_node, failures=(), reason="") -> RoundRecord:
    """A round as fedtune 0.1-era lines look (no failure keys, a round-level train_loss, per-node dicts without
    names), read the way the run directory reads them."""
    return RoundRecord.from_json({"round": k, "status": status, "reason": reason, "seconds": 10.0 + k, "nodes_asked": len(per_node),
            "nodes_replied": sum(1 for m in per_node.values() if m["status"] == "ok"), "failures": list(failures),
            "bytes_received": 1_000_000, "train_loss": 1.0 / k, "epsilon_max": 2.0 * k, "secure_aggregation": True,
            "server_eval": {"test": {"accuracy": 0.5 + k / 10, "loss": 1.0}},
            "federated_eval": {"worst_accuracy": 0.4}, "per_node": per_node})


def make_run(path, *, finished: bool):
    rd = RunDir(path)
    rd.create(config={"privacy.enabled": True, "fed.secure-aggregation": True}, planned_rounds=3, resume=False)
    ok = lambda eps, cap=8.0: {"status": "ok", "epsilon": eps, "max_epsilon": cap, "delta": 1e-5}  # noqa: E731
    rd.append_round(round_line(1, per_node={"a": ok(3.0), "b": ok(6.6), "c": {"status": "refused"}},
                           failures=[{"node": "c", "status": "refused", "reason": "privacy budget exceeded"}]))
    rd.append_round(round_line(2, status="failed", reason="secure aggregation failed: too many nodes dropped out",
                           per_node={"a": ok(4.0), "b": {"status": "dropped"}},
                           failures=[{"node": "b", "status": "dropped", "reason": "no reply within 60s"}]))
    if finished:
        rd.append_round(round_line(3, per_node={"a": ok(8.0), "b": ok(7.0)}))
        rd.set_status("finished")
    return rd


def cli_actions(parser: argparse.ArgumentParser, path: list[str]):
    """Every (command words, argparse action) of the parser, sub-commands included."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from cli_actions(sp, [*path, name])
        elif not isinstance(a, argparse._HelpAction):
            yield " ".join(path), a
