"""What administrators watch: summaries of a run directory, read-only.

``run_view`` turns a run directory into one dict (run status, where a running server is, a row per
round, a row per node with its spend against its ceiling and against what the job planned);
``status_table`` prints it for a terminal. Readers never write into the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.common.formatting import num
from fedtune.common.operations.rundir import RoundRecord, RunDir

AMBER = 0.8  # share of a node's ceiling at which its budget bar turns amber
PLAN_TOLERANCE = 1e-3  # relative: an accountant's rounding of a calibrated spend is still "the plan"


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


def planned_epsilon(target: float | None, ceiling: float | None) -> float | None:
    """What the job planned to spend on a node: ``privacy.target-epsilon``, capped by the node's ceiling (nodes
    calibrate to ``min(target, ceiling)``); None without a target (DP off, or a run that recorded none)."""
    if target is None:
        return None
    return min(target, ceiling) if ceiling is not None and ceiling > 0 else target


def budget_state(epsilon: float | None, ceiling: float | None, *, planned: float | None = None,
                 refused: bool = False) -> str:
    """The colour of a node's budget bar, the one rule the dashboard and ``fedtune status`` show:

    - "red": the node's ceiling refused work (a reply with status ``refused`` in some round);
    - "amber": the spend is at least 80% of the ceiling, or above what this job planned (``planned``:
      earlier jobs on the same data source count too);
    - "ok": below both; "unknown": no figures yet.

    Reaching the plan is not red: a run that spent exactly its planned target did what it was asked.
    """
    if refused:
        return "red"
    if epsilon is None:
        return "unknown"
    if planned is not None and epsilon > planned * (1 + PLAN_TOLERANCE):
        return "amber"
    if ceiling is None or ceiling <= 0 or ceiling == float("inf"):
        return "ok"
    return "amber" if epsilon / ceiling >= AMBER else "ok"


def budget_note(n: dict) -> str:
    """A node's budget in words, next to its bar (``n``: a node of :func:`run_view`)."""
    if n.get("refused_round") is not None:
        return f"refused by its ceiling (round {n['refused_round']})"
    eps, plan, cap = n.get("epsilon"), n.get("planned"), n.get("max_epsilon")
    if eps is None:
        return "no figures yet"
    if plan is not None and eps > plan * (1 + PLAN_TOLERANCE):
        return "above this job's plan (earlier jobs on its data count)"
    parts = []
    if plan:
        parts.append(f"{100 * eps / plan:.0f}% of plan")
    if cap and cap != float("inf"):
        parts.append(f"{100 * eps / cap:.0f}% of ceiling")
    return ", ".join(parts)


def live_progress(rd: RunDir, status: str | None, now: float | None = None) -> dict | None:
    """Where a running server is (its ``progress.json``) with the seconds elapsed; None once the run is over."""
    p = rd.progress() if status == "running" else None
    if p is None:
        return None
    now = time.time() if now is None else now
    since = lambda t: max(0.0, now - t) if t is not None else None  # noqa: E731
    return {**p.to_json(), "round_elapsed": since(p.round_started), "phase_elapsed": since(p.phase_started),
            "age": since(p.updated)}


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
    refused: dict[str, int] = {}  # node key -> first round its ceiling refused work
    for r in rounds:
        for key in [k for k, m in r.per_node.items() if m.status == "refused"] + [
                f.who for f in r.failures if f.status == "refused"]:
            refused.setdefault(key, r.round)
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
    target = cfg.get("privacy.target-epsilon") if cfg.get("privacy.enabled", True) not in (False, "false") else None
    target = target if isinstance(target, (int, float)) and not isinstance(target, bool) else None
    for n in nodes.values():
        if n["max_epsilon"] is None and sim_ceiling and simulated:
            n["max_epsilon"] = sim_ceiling  # a simulated node: the ceiling every simulated node had
        n["planned"] = planned_epsilon(target, n["max_epsilon"])
        n["refused_round"] = refused.get(n["key"])
        n["budget"] = budget_state(n["epsilon"], n["max_epsilon"], planned=n["planned"],
                                   refused=n["refused_round"] is not None)
        n["budget_note"] = budget_note(n)
        if shown.count(n["name"]) > 1:  # two nodes claim one name: show which is which
            n["name"] = f"{n['name']} (node {n['key']})"
    live = live_progress(rd, info.get("status"))
    ceilings = [n["max_epsilon"] for n in nodes.values() if n["max_epsilon"] not in (None, float("inf"))]
    last_acc = next((r["test_accuracy"] for r in reversed(rows) if r["test_accuracy"] is not None), None)
    return {"name": rd.path.name, "status": info.get("status"), "planned_rounds": info.get("planned_rounds"),
            "progress": live, "target_epsilon": target, "ceiling": min(ceilings, default=None),
            "max_epsilon": max((n["epsilon"] for n in nodes.values() if n["epsilon"] is not None), default=None),
            "final_accuracy": summary.final_test.get("accuracy", last_acc) if summary and summary.final else last_acc,
            "completed_rounds": len(rounds), "started": info.get("started"),
            "duration": (end - info["started"]) if end and info.get("started") else None,
            "secure_aggregation": any(r.secure_aggregation for r in rounds) if rounds else
            cfg.get("fed.secure-aggregation"), "dp": cfg.get("privacy.enabled"),
            "accountant": run_accountant(rounds, default=cfg.get("privacy.accountant")),
            "max_grad_norm": cfg.get("privacy.max-grad-norm"),
            "delta": max((n["delta"] for n in nodes.values() if n.get("delta") is not None), default=None),
            "rounds": rows, "nodes": sorted(nodes.values(), key=lambda n: n["name"]), "config": cfg,
            "majority_baseline": (summary.majority_baseline if summary else None)
            or (prog.majority_baseline if (prog := rd.progress()) else None),  # known from the run's start
            "warnings": list(summary.warnings) if summary else []}


def _f(v, nd: int = 4) -> str:
    return num(v, f".{nd}f")


def progress_line(p: dict) -> str:
    """Where a running server is, in one line (``p``: ``run_view``'s ``progress``)."""
    if p["round"] == 0:
        return f"now: {p['phase']} (loading the model and the server's data), {_f(p['phase_elapsed'], 0)}s"
    nodes = ", ".join(f"{label} {p[k]}" for label, k in (("connected", "nodes_connected"), ("asked", "nodes_asked"),
                                                        ("replied", "nodes_replied")) if p.get(k) is not None)
    timeout = f" of {_f(p['timeout'], 0)}s timeout" if p.get("timeout") else ""
    return (f"now: round {p['round']} of {num(p['planned_rounds'])}, {p['phase']} for {_f(p['phase_elapsed'], 0)}s"
            f"{timeout}" + (f"; nodes {nodes}" if nodes else "") + f"; round elapsed {_f(p['round_elapsed'], 0)}s")


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
    if view.get("progress"):
        lines.insert(1, progress_line(view["progress"]))
    for r in view["rounds"]:
        lines.append(f"{r['round']:>5} {r['status']:<7} {r['replied']:>3}/{r['asked']:<3} {r['failed']:>6} "
                     f"{_f(r['val_loss']):>10} {_f(r.get('test_macro_f1')):>8} {_f(r['test_accuracy']):>8} "
                     f"{_f(r['worst_node_accuracy']):>10} "
                     f"{_f(r['epsilon_max'], 2):>8} {r['bytes_received'] / 1e6:>7.2f} {r['seconds']:>6.1f}")
        if r["status"] != "ok":
            lines.append(f"      failed: {r['reason']}")
    lines += ["", f"{'node':<16} {'rounds':>6} {'epsilon':>8} {'planned':>8} {'ceiling':>8} {'budget':<8} last error"]
    for n in view["nodes"]:
        err = f"round {n['last_error_round']}: {n['last_error'][:70]}" if n["last_error"] else ""
        lines.append(f"{n['name']:<16} {len(n['rounds']):>6} {_f(n['epsilon'], 3):>8} {_f(n.get('planned'), 2):>8} "
                     f"{_f(n['max_epsilon'], 2):>8} {n['budget']:<8} {err}")
    return "\n".join(lines)
