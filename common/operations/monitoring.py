"""What administrators watch: summaries of a run directory, read-only.

``run_view`` turns a run directory into one dict (run status, a row per round, a row
per node with its spend against its ceiling); ``status_table`` prints it for a terminal.
Readers never write into the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.common.formatting import num
from fedtune.common.operations.rundir import RoundRecord, RunDir

AMBER = 0.8  # share of a node's ceiling at which its budget bar turns amber


def node_privacy(rounds: list[RoundRecord], upto: int | None = None) -> dict[str, dict]:
    """Per node, its privacy figures over every round of the run up to ``upto`` (all of them by default).

    The one source of these figures for ``summary.json``, the model card and monitoring. It reads
    the round lines, so rounds run before a resume count as much as those after it. ``epsilon`` is
    the node's spend on its data source after its last release in the run (training or a noised
    evaluation answer), as its ledger reported it; ``steps`` sums the DP-SGD steps of every round;
    ``accountant`` is the one the node reported (absent for nodes of fedtune 0.1, which reported none).
    """
    nodes: dict[str, dict] = {}
    for r in rounds:
        if upto is not None and r.round > upto:
            continue
        for key, m in r.per_node.items():
            if m.status != "ok":
                continue
            p = nodes.setdefault(key, {"rounds": [], "steps": 0, "evaluations": 0, "epsilon": None})
            p["name"] = m.name if m.name is not None else key
            p["rounds"].append(r.round)
            p["steps"] += int(m.steps or 0)
            for k in ("noise_multiplier", "sample_rate", "delta", "max_epsilon", "accountant"):
                if getattr(m, k) is not None:
                    p[k] = getattr(m, k)
            p["epsilon"] = _later(p["epsilon"], m.epsilon)
        for key, e in (r.federated_eval.per_node if r.federated_eval else {}).items():
            p = nodes.setdefault(key, {"rounds": [], "steps": 0, "evaluations": 0, "epsilon": None})
            p.setdefault("name", e.name if e.name is not None else key)
            if e.accountant is not None:
                p.setdefault("accountant", e.accountant)
            p["evaluations"] += 1
            p["epsilon"] = _later(p["epsilon"], e.epsilon)
    return nodes


def run_accountant(rounds: list[RoundRecord], upto: int | None = None, *, default: str | None = None) -> str | None:
    """The accountant(s) of the run's epsilons up to round ``upto``: what the nodes reported with their figures
    (a deployed node keeps its own, whatever the job says), e.g. "pld" or "pld, rdp". ``default`` (the job's
    ``privacy.accountant``) only when no node reported one: runs of fedtune 0.1, or no node answered yet.

    The one way ``summary.json``, the export record (and so the model card), ``fedtune status``, the dashboard
    and the report decide it."""
    seen = sorted({a for r in rounds if upto is None or r.round <= upto for a in r.accountants})
    return ", ".join(seen) if seen else default


def _later(old: float | None, new: float | None) -> float | None:
    """A ledger's total only grows: the larger of two reports is the later one."""
    if new is None:
        return old
    return new if old is None else max(old, new)


def budget_state(epsilon: float | None, ceiling: float | None) -> str:
    """"ok", "amber" (>= 80% of the ceiling) or "red" (at the ceiling); "unknown" without figures."""
    if epsilon is None or ceiling is None or ceiling <= 0 or ceiling == float("inf"):
        return "unknown" if epsilon is None else "ok"
    share = epsilon / ceiling
    return "red" if share >= 0.999 else "amber" if share >= AMBER else "ok"


def run_view(run_dir: str | Path) -> dict:
    """The run's status, rounds and nodes as plain data."""
    rd = RunDir(run_dir)
    info, cfg, rounds, summary = rd.read_run(), rd.read_config(), rd.rounds(), rd.summary()
    end = info.get("finished") or (time.time() if info.get("status") == "running" else info.get("updated"))
    rows = []
    nodes: dict[str, dict] = {}
    blank = {"rounds": [], "epsilon": None, "max_epsilon": None, "last_error": None, "last_error_round": None}
    for key, p in node_privacy(rounds).items():
        nodes[key] = {**blank, "key": key, "name": p.get("name", key), "rounds": p["rounds"], "epsilon": p["epsilon"],
                      "max_epsilon": p.get("max_epsilon"), "delta": p.get("delta"), "steps": p["steps"],
                      "evaluations": p["evaluations"]}
    for r in rounds:
        se, val, fe = r.server_test, r.server_val, r.federated_eval
        rows.append({"round": r.round, "status": r.status, "reason": r.reason,
                     "asked": r.nodes_asked, "replied": r.nodes_replied, "failed": len(r.failures),
                     "failures": [f.to_json() for f in r.failures], "seconds": r.seconds,
                     "bytes_received": r.bytes_received, "val_loss": val.get("loss"),
                     "test_accuracy": se.get("accuracy"), "test_macro_f1": se.get("macro_f1"),
                     "test_loss": se.get("loss"),
                     "worst_node_accuracy": fe.worst_node_accuracy if fe else None, "epsilon_max": r.epsilon_max})
        for f in r.failures:
            n = nodes.setdefault(f.who, {**blank, "key": f.who, "name": f.node})
            n["last_error"], n["last_error_round"] = f"{f.status}: {f.reason}", r.round
    sim_ceiling = cfg.get("sim.node-max-epsilon")
    simulated = rd.kind == "simulation"
    shown = [n["name"] for n in nodes.values()]
    for n in nodes.values():
        if n["max_epsilon"] is None and sim_ceiling and simulated:
            n["max_epsilon"] = sim_ceiling  # a simulated node: the ceiling every simulated node had
        n["budget"] = budget_state(n["epsilon"], n["max_epsilon"])
        if shown.count(n["name"]) > 1:  # two nodes claim one name: show which is which
            n["name"] = f"{n['name']} (node {n['key']})"
    return {"name": rd.path.name, "status": info.get("status"), "planned_rounds": info.get("planned_rounds"),
            "completed_rounds": len(rounds), "started": info.get("started"),
            "duration": (end - info["started"]) if end and info.get("started") else None,
            "secure_aggregation": any(r.secure_aggregation for r in rounds) if rounds else
            cfg.get("fed.secure-aggregation"), "dp": cfg.get("privacy.enabled"),
            "accountant": run_accountant(rounds, default=cfg.get("privacy.accountant")),
            "max_grad_norm": cfg.get("privacy.max-grad-norm"),
            "delta": max((n["delta"] for n in nodes.values() if n.get("delta") is not None), default=None),
            "rounds": rows, "nodes": sorted(nodes.values(), key=lambda n: n["name"]), "config": cfg,
            "majority_baseline": summary.majority_baseline if summary else None,
            "warnings": list(summary.warnings) if summary else []}


def _f(v, nd: int = 4) -> str:
    return num(v, f".{nd}f")


def status_table(view: dict) -> str:
    """The run as text tables (for operators without a browser)."""
    lines = [f"run {view['name']}: {view['status']}, rounds {view['completed_rounds']}/{view['planned_rounds']}, "
             f"{_f(view['duration'], 0)}s; DP {'on' if view['dp'] else 'OFF'}, secure aggregation "
             f"{'on' if view['secure_aggregation'] else 'OFF'}", "",
             f"{'round':>5} {'status':<7} {'nodes':>7} {'failed':>6} {'val loss':>10} {'macro-F1':>8} {'test acc':>8} "
             f"{'worst node':>10} {'max eps':>8} {'MB in':>7} {'secs':>6}"]
    mb = view.get("majority_baseline")
    if mb:
        lines.insert(1, f"majority-class baseline on the server's test split: accuracy {_f(mb['accuracy'])}, "
                        f"macro-F1 {_f(mb['macro_f1'])} (always {mb['label']!r})")
    lines[1:1] = [f"WARNING: {w}" for w in view.get("warnings") or []]
    for r in view["rounds"]:
        lines.append(f"{r['round']:>5} {r['status']:<7} {r['replied']:>3}/{r['asked']:<3} {r['failed']:>6} "
                     f"{_f(r['val_loss']):>10} {_f(r.get('test_macro_f1')):>8} {_f(r['test_accuracy']):>8} "
                     f"{_f(r['worst_node_accuracy']):>10} "
                     f"{_f(r['epsilon_max'], 2):>8} {r['bytes_received'] / 1e6:>7.2f} {r['seconds']:>6.1f}")
        if r["status"] != "ok":
            lines.append(f"      failed: {r['reason']}")
    lines += ["", f"{'node':<16} {'rounds':>6} {'epsilon':>8} {'ceiling':>8} {'budget':<8} last error"]
    for n in view["nodes"]:
        err = f"round {n['last_error_round']}: {n['last_error'][:70]}" if n["last_error"] else ""
        lines.append(f"{n['name']:<16} {len(n['rounds']):>6} {_f(n['epsilon'], 3):>8} {_f(n['max_epsilon'], 2):>8} "
                     f"{n['budget']:<8} {err}")
    return "\n".join(lines)
