"""A job that would take more than half of a node's remaining budget is warned about when it is planned, never
refused for it; the warning reads the job's settings and the ledger only, never the records."""

from __future__ import annotations

import logging

from fedtune.common.training import node
from fedtune.common.training.local import train_locally
from helpers import EASY_LABELS, small_config, write_easy_csv


def _cfg(csv, target: float, **extra):
    return small_config(**{"data.path": str(csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                           "train.local-steps": 2, "privacy.target-epsilon": target, **extra})


def _policy(ceiling: float) -> node.NodePolicy:
    return node.NodePolicy(source="notes", max_epsilon=ceiling, evaluate=False)


def test_budget_warning_is_about_more_than_half_of_what_is_left():
    assert node.budget_warning("j", planned=5.0, spent=0.0, ceiling=8.0, source="s")
    assert node.budget_warning("j", planned=1.5, spent=6.0, ceiling=8.0, source="s")  # 1.5 of the 2 left
    assert node.budget_warning("j", planned=3.9, spent=0.0, ceiling=8.0, source="s") is None
    assert node.budget_warning("j", planned=0.9, spent=6.0, ceiling=8.0, source="s") is None
    assert node.budget_warning("j", planned=50.0, spent=0.0, ceiling=float("inf"), source="s") is None


def test_a_job_taking_more_than_half_is_warned_on_the_node_and_still_planned(tmp_path, fresh_easy, caplog):
    # Prepare: a node with ceiling 8; a job at the default-like target 8 and a trial job at 1
    csv = write_easy_csv(tmp_path / "notes.csv", n=60, seed=0)
    big = node.prepare(_cfg(csv, 8), _policy(8), state_dir=tmp_path / "a", model=fresh_easy)
    small = node.prepare(_cfg(csv, 1), _policy(8), state_dir=tmp_path / "b", model=fresh_easy)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedtune.common.training.node"):
        big_plan = node.job_plan(big, "run-big")
        node.job_plan(big, "run-big")  # planned once: warned once
        small_plan = node.job_plan(small, "run-small")
    # Assert: warned (job, spend, what is left, the fix) for the big job only; both are planned, neither refused
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "'run-big'" in warned[0] and "of the 8.00 left" in warned[0] and "privacy.target-epsilon" in warned[0]
    assert big_plan.noise_multiplier > 0 and small_plan.noise_multiplier > big_plan.noise_multiplier


def test_the_warning_depends_on_settings_and_ledger_not_on_the_records(tmp_path, fresh_easy):
    # Prepare: two nodes with as many records of different content, the same ledger state (empty)
    seen = []
    for i in range(2):
        csv = write_easy_csv(tmp_path / f"notes-{i}.csv", n=60, seed=10 + i)
        n = node.prepare(_cfg(csv, 6), _policy(8), state_dir=tmp_path / f"s{i}", model=fresh_easy)
        node.job_plan(n, "run", warn=seen.append)
    # Assert: the same warning, word for word
    assert len(seen) == 2 and seen[0] == seen[1]


def test_fedtune_local_prints_the_warning_for_a_big_job_only(tmp_path):
    csv = write_easy_csv(tmp_path / "notes.csv", n=60, seed=0)
    warned = {}
    for target in (8, 1):
        warned[target] = []
        train_locally(_cfg(csv, target, **{"train.local-steps": 1}), max_epsilon=8, state_dir=tmp_path / f"s{target}",
                      out=tmp_path / f"out{target}", say=lambda m: None, warn=warned[target].append)
    assert len(warned[8]) == 1 and warned[8][0].startswith("WARNING: job 'local-") and "half" in warned[8][0]
    assert warned[1] == []


def test_a_simulated_node_does_not_warn(tmp_path, fresh_easy, caplog):
    """A simulation's researcher sets both the job and the simulated ceiling (the demo spends its whole ceiling by
    design): its virtual nodes do not warn, where the same job on an organization's node does."""
    from pathlib import Path

    from fedtune.client.node_config import simulated_settings

    csv = write_easy_csv(tmp_path / "notes.csv", n=60, seed=0)
    cfg = _cfg(csv, 8, **{"sim.node-max-epsilon": 8.0})
    policy = simulated_settings(cfg, 0, 3, Path(tmp_path)).policy
    sim = node.prepare(cfg, policy, state_dir=tmp_path / "sim", model=fresh_easy)
    with caplog.at_level(logging.WARNING, logger="fedtune.common.training.node"):
        node.job_plan(sim, "demo")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
