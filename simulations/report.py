"""``report.md`` with PNG plots for a run directory (accuracy, loss and epsilon per round, baselines)."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.common.formatting import num
from fedtune.common.operations import tracking
from fedtune.common.operations.curve import draw, read_curve
from fedtune.common.operations.curve import table as curve_table
from fedtune.common.operations.monitoring import run_accountant
from fedtune.common.operations.rundir import RoundRecord, RunDir, RunSummary
from fedtune.common.training.config import adapter_description


def _plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list, list]]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _xy(rounds: list[RoundRecord], get) -> tuple[list, list]:
    xs, ys = [], []
    for r in rounds:
        try:
            v = get(r)
        except (KeyError, TypeError, AttributeError):
            v = None
        if v is not None:
            xs.append(r.round)
            ys.append(v)
    return xs, ys


def _fmt(v, nd=4) -> str:
    return num(v, f".{nd}f")


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into the run directory; returns the report's path."""
    rd = RunDir(run_dir)
    rounds, summary, cfg = rd.rounds(), rd.summary() or RunSummary(), rd.read_config()
    plots = rd.path / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    if _plot(plots / "accuracy.png", "Accuracy per round", "accuracy", {
        "server val": _xy(rounds, lambda r: r.server_val.get("accuracy")),
        "server test": _xy(rounds, lambda r: r.server_test.get("accuracy")),
        "nodes (mean)": _xy(rounds, lambda r: r.federated_eval.accuracy),
        "worst node": _xy(rounds, lambda r: r.federated_eval.worst_node_accuracy),
    }):
        made.append(("Accuracy", "accuracy.png"))
    if _plot(plots / "loss.png", "Loss per round", "loss", {
        "server val": _xy(rounds, lambda r: r.server_val.get("loss")),
    }):
        made.append(("Loss", "loss.png"))
    names = sorted({n for r in rounds for n in r.epsilon_per_node})
    if _plot(plots / "epsilon.png", "Privacy spent per node (epsilon)", "epsilon", {
        n: _xy(rounds, lambda r, n=n: r.epsilon_per_node.get(n)) for n in names}):
        made.append(("Epsilon", "epsilon.png"))

    lines = [f"# fedtune run `{rd.path.name}`", ""]
    trained = adapter_description(r=cfg.get("lora.r"), ffa=bool(cfg.get("lora.ffa")),
                                  head_only=bool(cfg.get("lora.head-only")))
    info = rd.read_run()
    lines += [f"- status: **{info.get('status')}**, rounds {len(rounds)}/{info.get('planned_rounds')}, "
              f"wall time {summary.seconds:.0f}s of rounds",
              f"- nodes: {cfg.get('fed.num-nodes')} ({cfg.get('sim.partitioner')} partitions, "
              f"alpha {cfg.get('sim.alpha')}), aggregation {cfg.get('fed.aggregation')}, "
              f"secure aggregation {'on' if summary.privacy and summary.privacy.secure_aggregation else 'off'}",
              f"- model: {cfg.get('model.path') or 'all-MiniLM-L6-v2'}, "
              f"{trained}, max length "
              f"{cfg.get('model.max-length')}",
              f"- privacy: {'DP-SGD, target epsilon ' + str(cfg.get('privacy.target-epsilon')) if cfg.get('privacy.enabled') else '**no differential privacy**'}, "
              f"clip {cfg.get('privacy.max-grad-norm')}, accountant "
              f"{run_accountant(rounds, default=cfg.get('privacy.accountant'))}", ""]
    final = summary.final or {}
    if (final.get("test") or {}).get("perplexity") is not None:
        lines += lm_lines(summary, cfg)
    elif final.get("test"):
        t = final["test"]
        mb = summary.majority_baseline or {}
        lines += ["## Final global adapter (server held-out test split)", "",
                  f"macro-F1 **{_fmt(t.get('macro_f1'))}**, accuracy **{_fmt(t.get('accuracy'))}** (majority-class "
                  f"baseline: accuracy {_fmt(mb.get('accuracy'))}, macro-F1 {_fmt(mb.get('macro_f1'))}), "
                  f"loss {_fmt(t.get('loss'))}, n={t.get('n')}", ""]
        if summary.class_weights:
            lines += [f"Class-weighted loss: {', '.join(_fmt(w, 2) for w in summary.class_weights)} "
                      f"(from the server's held-out labels).", ""]
    lines += [f"**WARNING: {w}**" for w in summary.warnings] + ([""] if summary.warnings else [])
    lines += fairness_lines((final.get("test") or {}).get("fairness"))
    fe = summary.federated_eval
    if fe and fe.worst_node_accuracy is not None:
        lines += [f"Nodes' own test data (noised answers, estimates): pooled accuracy {_fmt(fe.accuracy)}, worst node "
                  f"{fe.worst_node} {_fmt(fe.worst_node_accuracy)}", ""]
    lines += fairness_lines(fe.fairness if fe else None, nodes=True)
    baselines = rd.path / "baselines.json"
    if baselines.exists():
        lines += ["## Baselines (same data split)", "", *baseline_table(json.loads(baselines.read_text())), ""]
    curve = read_curve(rd.path)
    if curve:
        (plots / "privacy_utility.png").write_bytes(draw(curve))
        lines += ["## Privacy-utility curve", "", "Test accuracy (server's held-out split) of the same job at each "
                  f"target epsilon (delta {_fmt(curve.get('delta'), 7)}); each point is its own run.", "",
                  *curve_table(curve), "", "![Privacy-utility](plots/privacy_utility.png)", ""]
    lines += ["## Rounds", "", "| round | status | nodes | val loss | test macro-F1 | test acc | worst node acc | "
              "max epsilon | MB in | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        worst = r.federated_eval.worst_node_accuracy if r.federated_eval else None
        lines.append(f"| {r.round} | {r.status} | {r.nodes_replied}/{r.nodes_asked} | "
                     f"{_fmt(r.server_val.get('loss'))} | {_fmt(r.server_test.get('macro_f1'))} | "
                     f"{_fmt(r.server_test.get('accuracy'))} | {_fmt(worst)} | "
                     f"{_fmt(r.epsilon_max, 3)} | {r.bytes_received / 1e6:.2f} | {r.seconds:.1f} |")
    failures = [(r.round, f) for r in rounds for f in r.failures]
    if failures:
        lines += ["", "## Failures", ""] + [f"- round {k}: {f.node} {f.status}: {f.reason}"
                                            for k, f in failures]
    nodes = summary.privacy.nodes if summary.privacy else {}
    if nodes:
        lines += ["", "## Privacy spent per node", "", "| node | epsilon | delta | noise multiplier | sample rate | "
                  "steps | rounds |", "|---|---|---|---|---|---|---|"]
        for n, p in sorted(nodes.items()):
            lines.append(f"| {n} | {_fmt(p.get('epsilon'), 3)} | {_fmt(p.get('delta'), 7)} | "
                         f"{_fmt(p.get('noise_multiplier'), 3)} | {_fmt(p.get('sample_rate'), 4)} | "
                         f"{p.get('steps')} | {len(p.get('rounds', []))} |")
    if made:
        lines += ["", "## Plots", ""] + [f"![{t}](plots/{f})" for t, f in made]
    out = rd.path / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tracking.log_report(cfg, rd.path)  # fed.tracking=mlflow: the report and its plots as the run's artifacts
    return out


def lm_lines(summary: RunSummary, cfg: dict) -> list[str]:
    """A causal LM's figures on the server's held-out split: the base model (round 0) against the tuned one."""
    t = summary.final_test
    base = (summary.initial or {}).get("test") or {}
    dp = f"DP at epsilon {cfg.get('privacy.target-epsilon')}" if cfg.get("privacy.enabled") else "no DP"
    lines = ["## Held-out test split (server)", "",
             "| model | response perplexity (lower is better) | ROUGE-L of generated answers | answers |",
             "|---|---|---|---|"]
    if base:
        lines.append(f"| base model, zero-shot (round 0) | {_fmt(base.get('perplexity'), 2)} | "
                     f"{_fmt(base.get('rouge_l'))} | {base.get('generated', '-')} |")
    lines.append(f"| federated ({dp}) | **{_fmt(t.get('perplexity'), 2)}** | **{_fmt(t.get('rouge_l'))}** | "
                 f"{t.get('generated', '-')} |")
    lines.append("")
    if base.get("perplexity") and t.get("perplexity") is not None:
        change = 100 * (t["perplexity"] / base["perplexity"] - 1)
        said = f"Against the base model: response perplexity {change:+.1f}%"
        if base.get("rouge_l") is not None and t.get("rouge_l") is not None:
            said += f", ROUGE-L {t['rouge_l'] - base['rouge_l']:+.4f}"
        better = t["perplexity"] < base["perplexity"] and (t.get("rouge_l") or 0) > (base.get("rouge_l") or 0)
        lines += [said + (" (better on both)." if better else " (NOT better on both)."), ""]
    if t.get("examples"):
        lines += ["Examples (greedy answers to held-out prompts):", "", "| reference | generated |", "|---|---|"]
        lines += [f"| {e['reference'].replace('|', '/')} | {e['generated'].replace('|', '/')} |"
                  for e in t["examples"]] + [""]
    return lines


def fairness_lines(f: dict | None, *, nodes: bool = False) -> list[str]:
    """A fairness audit as Markdown (empty without data.group-column): of the server's test split, or
    (``nodes``) of the nodes' own test splits from their noised per-group answers."""
    if not f:
        return []
    where = (f"nodes' own test splits: noised per-group answers of {f.get('nodes')} node(s), summed; estimates"
             if nodes else "server held-out test split")
    lines = [f"## Fairness audit ({where}, by data.group-column)", "",
             "| group | records | accuracy | macro-F1 |", "|---|---|---|---|"]
    lines += [f"| {g} | {m['n']} | {_fmt(m['accuracy'])} | {_fmt(m['macro_f1'])} |" for g, m in f["groups"].items()]
    lines += ["", f"Largest gaps between groups: accuracy {_fmt(f['accuracy_gap'])}, macro-F1 {_fmt(f['macro_f1_gap'])}; "
              f"demographic-parity difference {_fmt(f['demographic_parity_difference'])} (class "
              f"{f['demographic_parity_class']}), equalized-odds difference {_fmt(f['equalized_odds_difference'])} "
              f"(class {f['equalized_odds_class']}); worst group: {f['worst_group']}. DP-SGD is known to cost "
              "minority groups more: compare with the no-DP rows of the baselines.", ""]
    return lines


def lm_baseline_table(results: list[dict]) -> list[str]:
    """Markdown rows for a language model: response perplexity and ROUGE-L per setting."""
    rows = ["| setting | response perplexity | ROUGE-L | epsilon | seconds |", "|---|---|---|---|---|"]
    for b in results:
        if b.get("error"):
            rows.append(f"| {b['name']} | not run: {b['error']} | | | |")
        else:
            rows.append(f"| {b['name']} | {_fmt(b.get('perplexity'), 2)} | {_fmt(b.get('rouge_l'))} | "
                        f"{_fmt(b.get('epsilon'), 2)} | {b.get('seconds', 0):.0f} |")
    notes = [f"{b['name']}: {s['node']} skipped ({s['reason']})" for b in results for s in b.get("skipped") or []]
    return rows + ([""] + notes if notes else [])


def baseline_table(results: list[dict]) -> list[str]:
    """Markdown rows: one per baseline (accuracy, macro-F1, worst node accuracy, epsilon, seconds)."""
    scored = [b for b in results if not b.get("error")]
    if any(b.get("perplexity") is not None for b in scored) and all(b.get("accuracy") is None for b in scored):
        return lm_baseline_table(results)
    gaps = any(b.get("group_gap") is not None for b in results)  # with a fairness audit (data.group-column)
    rows = ["| setting | macro-F1 | test accuracy | worst node accuracy | epsilon | seconds |"
            + (" accuracy gap between groups |" if gaps else ""), "|---|---|---|---|---|---|" + ("---|" if gaps else "")]
    notes = []
    for b in results:
        if b.get("error"):
            rows.append(f"| {b['name']} | not run: {b['error']} | | | | |" + (" |" if gaps else ""))
        else:
            rows.append(f"| {b['name']} | {_fmt(b.get('macro_f1'))} | {_fmt(b.get('accuracy'))} | "
                        f"{_fmt(b.get('worst_accuracy'))} | {_fmt(b.get('epsilon'), 2)} | {b.get('seconds', 0):.0f} |"
                        + (f" {_fmt(b.get('group_gap'))} |" if gaps else ""))
        notes += [f"{b['name']}: {s['node']} skipped ({s['reason']})" for s in b.get("skipped") or []]
    return rows + ([""] + notes if notes else [])
