"""Run summaries for administrators, built from a run directory (read-only)."""

from __future__ import annotations

import hashlib

from fedtune.cli import main
from fedtune.common.operations.monitoring import budget_state, run_view, status_table
from fedtune.common.operations.rundir import RunDir


def _round(k, *, status="ok", per_node, failures=(), reason=""):
    return {"round": k, "status": status, "reason": reason, "seconds": 10.0 + k, "nodes_asked": len(per_node),
            "nodes_replied": sum(1 for m in per_node.values() if m["status"] == "ok"), "failures": list(failures),
            "bytes_received": 1_000_000, "train_loss": 1.0 / k, "epsilon_max": 2.0 * k, "secure_aggregation": True,
            "server_eval": {"test": {"accuracy": 0.5 + k / 10, "loss": 1.0}},
            "federated_eval": {"worst_accuracy": 0.4}, "per_node": per_node}


def _make_run(path, *, finished: bool):
    rd = RunDir(path)
    rd.create(config={"privacy.enabled": True, "fed.secure-aggregation": True}, planned_rounds=3, resume=False)
    ok = lambda eps, cap=8.0: {"status": "ok", "epsilon": eps, "max-epsilon": cap, "delta": 1e-5}  # noqa: E731
    rd.append_round(_round(1, per_node={"a": ok(3.0), "b": ok(6.6), "c": {"status": "refused"}},
                           failures=[{"node": "c", "status": "refused", "reason": "privacy budget exceeded"}]))
    rd.append_round(_round(2, status="failed", reason="secure aggregation failed: too many nodes dropped out",
                           per_node={"a": ok(4.0), "b": {"status": "dropped"}},
                           failures=[{"node": "b", "status": "dropped", "reason": "no reply within 60s"}]))
    if finished:
        rd.append_round(_round(3, per_node={"a": ok(8.0), "b": ok(7.0)}))
        rd.set_status("finished")
    return rd


def test_view_of_a_run_with_failures_skips_and_a_node_at_its_ceiling(tmp_path):
    rd = _make_run(tmp_path / "run", finished=True)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in rd.path.rglob("*") if p.is_file()}
    view = run_view(rd.path)
    assert (view["status"], view["completed_rounds"], view["planned_rounds"]) == ("finished", 3, 3)
    assert view["delta"] == 1e-5 and view["dp"] and view["secure_aggregation"]
    assert [(r["round"], r["status"], r["replied"], r["asked"], r["failed"]) for r in view["rounds"]] == [
        (1, "ok", 2, 3, 1), (2, "failed", 1, 2, 1), (3, "ok", 2, 2, 0)]
    nodes = {n["name"]: n for n in view["nodes"]}
    assert nodes["a"]["rounds"] == [1, 2, 3] and nodes["a"]["epsilon"] == 8.0 and nodes["a"]["budget"] == "red"
    assert nodes["b"]["rounds"] == [1, 3] and nodes["b"]["budget"] == "amber"  # 7 of 8
    assert nodes["b"]["last_error"].startswith("dropped") and nodes["b"]["last_error_round"] == 2
    assert nodes["c"]["rounds"] == [] and "budget exceeded" in nodes["c"]["last_error"]
    text = status_table(view)
    assert "failed: secure aggregation failed" in text and "red" in text and "amber" in text
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in rd.path.rglob("*") if p.is_file()}
    assert before == after  # read-only


def test_view_of_a_run_in_progress(tmp_path, capsys):
    rd = _make_run(tmp_path / "run", finished=False)
    view = run_view(rd.path)
    assert view["status"] == "running" and view["completed_rounds"] == 2 and view["duration"] > 0
    assert main(["status", str(rd.path)]) == 0
    assert "rounds 2/3" in capsys.readouterr().out


def test_budget_states():
    assert [budget_state(e, 10.0) for e in (1.0, 8.0, 9.995, None)] == ["ok", "amber", "red", "unknown"]
    assert budget_state(5.0, float("inf")) == "ok"
