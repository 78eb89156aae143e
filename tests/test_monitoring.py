"""Run summaries for administrators, built from a run directory (read-only)."""

from __future__ import annotations

import hashlib

from fedtune.cli import main
from fedtune.common.operations.monitoring import budget_state, run_view, status_table
from helpers import make_run


def test_view_of_a_run_with_failures_skips_and_a_node_at_its_ceiling(tmp_path):
    rd = make_run(tmp_path / "run", finished=True)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in rd.path.rglob("*") if p.is_file()}
    view = run_view(rd.path)
    assert (view["status"], view["completed_rounds"], view["planned_rounds"]) == ("finished", 3, 3)
    assert view["delta"] == 1e-5 and view["dp"] and view["secure_aggregation"]
    assert [(r["round"], r["status"], r["replied"], r["asked"], r["failed"]) for r in view["rounds"]] == [
        (1, "ok", 2, 3, 1), (2, "failed", 1, 2, 1), (3, "ok", 2, 2, 0)]
    nodes = {n["name"]: n for n in view["nodes"]}
    assert nodes["a"]["rounds"] == [1, 2, 3] and nodes["a"]["epsilon"] == 8.0 and nodes["a"]["budget"] == "amber"
    assert nodes["b"]["rounds"] == [1, 3] and nodes["b"]["budget"] == "amber"  # 7 of 8
    assert nodes["b"]["last_error"].startswith("dropped") and nodes["b"]["last_error_round"] == 2
    assert nodes["c"]["rounds"] == [] and "budget exceeded" in nodes["c"]["last_error"]
    assert nodes["c"]["budget"] == "red" and nodes["c"]["refused_round"] == 1  # red: its ceiling refused work
    text = status_table(view)
    assert "failed: secure aggregation failed" in text and "red" in text and "amber" in text
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in rd.path.rglob("*") if p.is_file()}
    assert before == after  # read-only


def test_view_of_a_run_in_progress(tmp_path, capsys):
    rd = make_run(tmp_path / "run", finished=False)
    view = run_view(rd.path)
    assert view["status"] == "running" and view["completed_rounds"] == 2 and view["duration"] > 0
    assert main(["status", str(rd.path)]) == 0
    assert "rounds 2/3" in capsys.readouterr().out


def test_budget_states():
    assert [budget_state(e, 10.0) for e in (1.0, 8.0, 9.995, 10.0, None)] == ["ok", "amber", "amber", "amber", "unknown"]
    assert budget_state(None, 10.0, refused=True) == "red"  # red only when the ceiling refused work
    assert budget_state(5.0, float("inf")) == "ok"
