"""Baselines on the same split as a federated run, for comparison in its report.

- centralized, no DP:   one node holding every organization's training records
- centralized, DP:      the same with DP-SGD at the job's target epsilon
- local only, DP:       each organization alone on its own records (mean and worst)
- federated, DP / no DP: the federated job itself (from the run directory / a second simulation)

Centralized and local runs make ``sim.baseline-epochs`` passes over their records
with the job's optimizer and privacy settings (DP calibrated to the same target).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.operations import tracking
from fedtune.common.operations.rundir import RunSummary
from fedtune.common.privacy.accounting import DEFAULT_DELTA
from fedtune.common.training import data
from fedtune.common.training.config import JobConfig
from fedtune.common.training.federated_data import global_splits, node_splits
from fedtune.common.training.imbalance import class_weights, majority_baseline
from fedtune.common.training.node import NodePolicy, evaluate_split, prepare, train_round


def _train_eval(cfg: JobConfig, splits: data.Splits, *, dp: bool, label: str,
                out: Callable[[str], None]) -> dict:
    epochs = cfg.sim.baseline_epochs
    job = cfg.replace(**{"train.rounds": 1, "train.local-epochs": epochs, "privacy.enabled": dp,
                         "train.local-steps": 0})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as state:
        policy = NodePolicy(source=label, max_epsilon=cfg.privacy.target_epsilon if dp else math.inf,
                            delta=cfg.privacy.delta or DEFAULT_DELTA, accountant=cfg.privacy.accountant,
                            warn_large_jobs=False)  # a baseline spends its own throwaway budget, by design
        node = prepare(job, policy, state_dir=state, splits=splits)
        res = train_round(node, job=label, round=1, federated=False, class_weights=server_class_weights(cfg))
        m = evaluate_split(node, "test")
        if splits.test.responses and cfg.model.eval_generate:  # instruction tuning: score generated answers too
            from fedtune.common.training.generate import generation_metrics

            mc = cfg.model
            m.update(generation_metrics(node.lora.model, node.lora.tokenizer, splits.test, n=mc.eval_generate,
                                        max_new_tokens=mc.max_new_tokens, max_prompt_tokens=mc.max_length))
    return {"accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"), "loss": m.get("loss"),
            "perplexity": m.get("perplexity"), "rouge_l": m.get("rouge_l"),
            "group_gap": (m.get("fairness") or {}).get("accuracy_gap"),
            "epsilon": res.epsilon_spent if dp else None, "seconds": time.perf_counter() - t0,
            "steps": res.stats.steps}


def server_class_weights(cfg: JobConfig) -> list[float] | None:
    """The class weights the federated run uses (from the server's held-out labels), for a fair comparison."""
    if cfg.model.task != "seq-cls":
        return None
    g = global_splits(cfg)
    return class_weights(g.val.labels + g.test.labels, g.labels, cfg.train.class_weighting)


def majority_row(cfg: JobConfig) -> dict:
    """Always answering the most common label: the floor every row above has to beat."""
    g = global_splits(cfg)
    m = majority_baseline(g.test.labels, g.labels) or {}
    return {"name": f"majority class (always {m.get('label')!r})", "accuracy": m.get("accuracy"),
            "macro_f1": m.get("macro_f1"), "epsilon": None, "seconds": 0.0}


def centralized(cfg: JobConfig, *, dp: bool, out: Callable[[str], None] = print) -> dict:
    g = global_splits(cfg)
    name = f"centralized, {'DP' if dp else 'no DP'}"
    out(f"baseline: {name} ({len(g.train)} records) ...")
    r = _train_eval(cfg, g, dp=dp, label=name, out=out)
    if r["accuracy"] is not None:
        out(f"  {name}: accuracy {r['accuracy']:.4f} in {r['seconds']:.0f}s")
    else:
        out(f"  {name}: test response perplexity {r['perplexity']:.2f}"
            + (f", ROUGE-L {r['rouge_l']:.4f}" if r.get("rouge_l") is not None else "") + f" in {r['seconds']:.0f}s")
    return {"name": name, **r}


def local_only(cfg: JobConfig, *, out: Callable[[str], None] = print) -> dict:
    """Each node alone (DP as configured); accuracy on the server's test split and on its own."""
    g = global_splits(cfg)
    per, own, skipped, t0 = [], [], [], time.perf_counter()
    dp = cfg.privacy.enabled
    name = f"local only, {'DP' if dp else 'no DP'} (mean of nodes)"
    for i in range(cfg.fed.num_nodes):
        ns = node_splits(cfg, i, cfg.fed.num_nodes)
        # train on the node's records; test on the shared held-out split
        splits = data.Splits(train=ns.train, val=ns.val, test=g.test, labels=ns.labels, fingerprint=ns.fingerprint,
                             n_source=ns.n_source, train_share=ns.train_share)
        out(f"baseline: local only, node-{i} ({len(ns.train)} records) ...")
        try:
            r = _train_eval(cfg, splits, dp=dp, label=f"local-{i}", out=out)
        except FedtuneError as e:  # a node that cannot train alone is recorded, not fatal
            out(f"  node-{i} skipped: {e.problem}")
            skipped.append({"node": f"node-{i}", "reason": e.problem})
            continue
        per.append(r["accuracy"] if r["accuracy"] is not None else r["perplexity"])
        own.append(r)
    if not own:
        return {"name": name, "error": "no node could train alone", "skipped": skipped,
                "seconds": time.perf_counter() - t0}
    mean = sum(per) / len(per)
    common = {"name": name, "epsilon": max((r["epsilon"] or 0) for r in own) if dp else None, "nodes": len(own),
              "skipped": skipped, "seconds": time.perf_counter() - t0}
    if own[0]["accuracy"] is None:  # a language model: mean perplexity and ROUGE-L of the nodes alone
        rouge = [r["rouge_l"] for r in own if r.get("rouge_l") is not None]
        out(f"  local only: mean test response perplexity {mean:.2f}, worst {max(per):.2f} over {len(own)} nodes")
        return {**common, "perplexity": mean, "worst_perplexity": max(per),
                "rouge_l": sum(rouge) / len(rouge) if rouge else None}
    out(f"  local only: mean accuracy {mean:.4f}, worst {min(per):.4f} over {len(own)} nodes"
        + (f" ({len(skipped)} skipped)" if skipped else ""))
    return {**common, "accuracy": mean, "macro_f1": sum(r["macro_f1"] for r in own) / len(own),
            "worst_accuracy": min(per)}


def federated_row(summary: dict | RunSummary, *, name: str, seconds: float) -> dict:
    """A federated run's baseline row, from its summary (``simulate``'s, as summary.json holds it)."""
    s = summary if isinstance(summary, RunSummary) else RunSummary.from_json(summary)
    final = s.final_test
    nodes = s.privacy.nodes if s.privacy else {}
    eps = [p.get("epsilon") for p in nodes.values() if p.get("epsilon") is not None]
    return {"name": name, "accuracy": final.get("accuracy"), "macro_f1": final.get("macro_f1"),
            "perplexity": final.get("perplexity"), "rouge_l": final.get("rouge_l"),
            "group_gap": (final.get("fairness") or {}).get("accuracy_gap"),
            "worst_accuracy": s.federated_eval.worst_node_accuracy if s.federated_eval else None,
            "epsilon": max(eps) if eps else None, "seconds": seconds}


def run_all(cfg: JobConfig, *, with_nodp: bool, out: Callable[[str], None] = print) -> tuple[Path, list[dict]]:
    """The federated DP run of ``cfg`` plus every baseline on the same split; rows saved in baselines.json.

    ``with_nodp``: also run the federation without DP (a second simulation)."""
    from fedtune.simulations.run import run_dir_of, simulate

    if cfg.fed.tracking:  # one MLflow experiment for the comparison: this run, its no-DP twin, baselines, curve
        where = run_dir_of(cfg)
        cfg = cfg.replace(**{"fed.run-dir": str(where), **tracked(cfg, where)})
    fed = simulate(cfg, report=False)
    run_dir = Path(fed["run_dir"])
    summary = RunSummary.from_json(fed["summary"])
    rows = [federated_row(summary, name="federated, DP (this run)", seconds=fed["seconds"])]
    base = (summary.initial or {}).get("test")
    if cfg.model.task == "seq-cls":
        rows.append(majority_row(cfg))
    elif base:  # the floor of a language model: the base model itself
        rows.append({"name": "base model, zero-shot", "perplexity": base.get("perplexity"),
                     "rouge_l": base.get("rouge_l"), "epsilon": None, "seconds": 0.0})
    if with_nodp:
        nodp = cfg.replace(**{"privacy.enabled": False, "sim.node-max-epsilon": math.inf,
                              "fed.run-dir": str(run_dir) + "-nodp"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = simulate(nodp, report=False)
        rows.append(federated_row(res["summary"], name="federated, no DP", seconds=res["seconds"]))
    for name, make in (("centralized, DP", lambda: centralized(cfg, dp=True, out=out)),
                       ("centralized, no DP", lambda: centralized(cfg, dp=False, out=out)),
                       ("local only", lambda: local_only(cfg, out=out))):
        try:
            rows.append(make())
        except FedtuneError as e:  # one baseline that cannot run does not lose the others' results
            out(f"  baseline {name} failed: {e}")
            rows.append({"name": name, "error": e.problem})
        (run_dir / "baselines.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    tracking.log_baselines(cfg.to_flat(), run_dir, rows)  # fed.tracking=mlflow: child runs of this run
    return run_dir, rows


def tracked(cfg: JobConfig, run_dir: Path) -> dict:
    """The MLflow experiment of a comparison's runs (``fed.tracking``): the one given, or named after its run."""
    if not cfg.fed.tracking:
        return {}
    return {"fed.tracking-experiment": cfg.fed.tracking_experiment or f"fedtune baselines {Path(run_dir).name}"}


def privacy_utility_curve(cfg: JobConfig, run_dir: Path, rows: list[dict], epsilons: list[float], *,
                          out: Callable[[str], None] = print) -> dict:
    """Test accuracy against epsilon: for each epsilon, the federated job, centralized DP and local only at that
    target; centralized no DP and majority class as levels. Saved as ``curve.json`` in ``run_dir``.

    ``rows`` are the baselines already run at the job's own target epsilon (reused, not run again). Each other
    epsilon's federated run gets its own run directory beside this one (``<run_dir>-eps<e>``) and its own
    simulated nodes: every point is a separate job an organization could choose, not a spend on top of this one.
    """
    from fedtune.common.operations.curve import FILE, check_job
    from fedtune.simulations.run import simulate

    check_job(cfg.model.task, cfg.privacy.enabled)
    by_name = {r.get("name"): r for r in rows}

    def point(r: dict | None) -> dict:
        if not r:
            return {"error": "not run"}
        if r.get("error"):
            return {"error": r["error"]}
        return {k: r.get(k) for k in ("accuracy", "macro_f1", "epsilon", "worst_accuracy", "seconds")}

    nodp = next((r for n, r in by_name.items() if n and n.startswith("centralized, no DP")), None)
    majority = next((r for n, r in by_name.items() if n and n.startswith("majority class")), None)
    curve = {"delta": cfg.privacy.delta or DEFAULT_DELTA, "job_epsilon": cfg.privacy.target_epsilon,
             "nodp": point(nodp), "majority": point(majority), "points": []}
    for i, eps in enumerate(epsilons, 1):
        out(f"privacy-utility curve: epsilon {eps:g} ({i} of {len(epsilons)})")
        if math.isclose(eps, cfg.privacy.target_epsilon):
            curve["points"].append({"epsilon": eps, "federated": point(by_name.get("federated, DP (this run)")),
                                    "centralized": point(by_name.get("centralized, DP")),
                                    "local_only": point(next((r for n, r in by_name.items()
                                                              if n and n.startswith("local only")), None)),
                                    "run_dir": str(run_dir)})
            continue
        job = cfg.replace(**{"privacy.target-epsilon": eps, "sim.node-max-epsilon": max(cfg.sim.node_max_epsilon, eps),
                             "fed.run-dir": f"{run_dir}-eps{eps:g}", **tracked(cfg, run_dir)})
        p: dict = {"epsilon": eps, "run_dir": job.fed.run_dir}
        try:
            res = simulate(job, out=lambda s: None, report=False)
            p["federated"] = point(federated_row(res["summary"], name="federated, DP", seconds=res["seconds"]))
        except FedtuneError as e:  # one point that cannot run does not lose the others
            out(f"  federated at epsilon {eps:g} failed: {e}")
            p["federated"] = {"error": e.problem}
        for key, make in (("centralized", lambda: centralized(job, dp=True, out=lambda s: None)),
                          ("local_only", lambda: local_only(job, out=lambda s: None))):
            try:
                p[key] = point(make())
            except FedtuneError as e:
                out(f"  {key.replace('_', ' ')} at epsilon {eps:g} failed: {e}")
                p[key] = {"error": e.problem}
        acc = {k: (p[k] or {}).get("accuracy") for k in ("federated", "centralized", "local_only")}
        out("  accuracy: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in acc.items() if v is not None))
        curve["points"].append(p)
        (run_dir / FILE).write_text(json.dumps(curve, indent=2, default=str) + "\n")
    curve["points"].sort(key=lambda q: q["epsilon"])
    (run_dir / FILE).write_text(json.dumps(curve, indent=2, default=str) + "\n")
    return curve
