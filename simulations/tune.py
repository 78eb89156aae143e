"""``fedtune tune``: search the training recipe on the user's data, each trial a federated simulation.

Optuna's TPE sampler proposes a recipe; each trial runs the scenario in simulation (the user's data
partitioned like their federation) and is scored on the server's validation split (macro-F1: the
test split stays untouched for the final figures). Hopeless trials are pruned on the per-round
validation curve (Optuna's median pruner; the run stops through its STOP file). The study lives in
an SQLite file in the study directory, so an interrupted search resumes.

Privacy. Choosing the best of several DP runs on private data releases more than one run, and this
search is adaptive: TPE picks each recipe from earlier trials' scores, the median pruner stops trials on
other trials' scores, and every trial's run directory is kept. A private-selection theorem (Papernot &
Steinke's bound for a random number of independent repetitions, only the best released) does not hold
for that, so the search is accounted by **composing every release of every trial**, which holds under
any adaptivity: every trial's simulated nodes keep their state in one directory of the study
(``nodes/``), so each simulated source's ledger holds the whole search (failed and pruned trials
included), its ceiling (``sim.node-max-epsilon``) bounds it, and the stated figure is that ledger's
total. Only settings that do not change a trial's privacy events are searched with DP on (optimizer,
learning rate, LoRA rank, FFA, clipping norm, class weighting, pooling); without DP (or on proxy data
the user calls public) batch size, local epochs and rounds too. The figures land in ``tuning.json``,
the report, and the chosen run's ``summary.json`` (so its model card states the total, tuning
included).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.operations.atomic import write_json_atomic
from fedtune.common.operations.rundir import RunDir, RunSummary
from fedtune.common.privacy import accounting
from fedtune.common.privacy.ledger import open_all, over_ceiling
from fedtune.common.training.config import JobConfig
from fedtune.common.training.model import mean_pooling_applies

PRIVATE_SPACE = ("train.optimizer", "train.lr", "lora.head-only", "lora.r", "lora.ffa", "privacy.max-grad-norm",
                 "train.class-weighting", "model.pooling")
SHAPE_SPACE = ("train.batch-size", "train.local-epochs", "train.rounds")  # change a trial's privacy events


NODES = "nodes"  # the study's simulated nodes' state (their ledgers hold every trial's releases)


def suggest(trial, cfg: JobConfig, fixed: set[str]) -> dict:
    """The recipe of one trial: searched keys not fixed by the user; the rest stay as in ``cfg``."""
    space = PRIVATE_SPACE + (() if cfg.privacy.enabled else SHAPE_SPACE)
    out: dict = {}

    def want(key: str) -> bool:
        return key in space and key not in fixed

    if want("train.optimizer"):
        out["train.optimizer"] = trial.suggest_categorical("train.optimizer", ["sgd", "adamw"])
    opt = out.get("train.optimizer", cfg.train.optimizer)
    if want("train.lr"):
        lo, hi = (0.3, 20.0) if opt == "sgd" else (1e-3, 5e-2)  # a head alone under DP wants SGD lr ~10
        out["train.lr"] = trial.suggest_float(f"train.lr ({opt})", lo, hi, log=True)
    if want("lora.head-only") and cfg.model.task == "seq-cls":
        out["lora.head-only"] = trial.suggest_categorical("lora.head-only", [False, True])
    if out.get("lora.head-only", cfg.lora.head_only) and cfg.model.task == "seq-cls":
        return out | _rest(trial, cfg, want)  # LoRA rank and FFA do not matter to a head trained alone
    if want("lora.r"):
        out["lora.r"] = trial.suggest_categorical("lora.r", [4, 8, 16])
    if want("lora.ffa"):
        out["lora.ffa"] = trial.suggest_categorical("lora.ffa", [True, False])
    return out | _rest(trial, cfg, want)


def _rest(trial, cfg: JobConfig, want) -> dict:
    out: dict = {}
    if want("privacy.max-grad-norm"):
        out["privacy.max-grad-norm"] = trial.suggest_categorical("privacy.max-grad-norm", [0.5, 1.0, 2.0])
    if want("train.class-weighting") and cfg.model.task == "seq-cls":
        out["train.class-weighting"] = trial.suggest_categorical("train.class-weighting", ["auto", "balanced", "none"])
    if want("model.pooling") and cfg.model.task == "seq-cls" and mean_pooling_applies(cfg.model.path):
        out["model.pooling"] = trial.suggest_categorical("model.pooling", ["cls", "mean"])
    if want("train.batch-size"):
        out["train.batch-size"] = trial.suggest_categorical("train.batch-size", [16, 32, 64])
    if want("train.local-epochs"):
        out["train.local-epochs"] = trial.suggest_categorical("train.local-epochs", [0.5, 1.0, 2.0])
    if want("train.rounds"):
        out["train.rounds"] = trial.suggest_int("train.rounds", 3, 10)
    return out


def _open_study(directory: Path, trials: int, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{directory / 'study.db'}")
    study = optuna.create_study(study_name="fedtune", storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    if "trials" not in study.user_attrs:
        study.enqueue_trial({}, user_attrs={"default": True})  # trial 0: the scenario's own recipe
    study.set_user_attr("trials", trials)  # a resumed search may ask for more (every trial composes anyway)
    return study


def fixed_keys(cfg: JobConfig, fixed: set[str], *, adapt_encoder: bool = False) -> set[str]:
    """The settings a search keeps: those given, and the encoder's adapter for a head-only job (unless asked)."""
    if cfg.lora.head_only and not adapt_encoder:
        return set(fixed) | {"lora.head-only", "lora.r", "lora.ffa"}  # no encoder adapter to shape
    return set(fixed)


def tune(cfg: JobConfig, *, trials: int, directory: str | Path, fixed: set[str] = frozenset(),
         timeout: float | None = None, adapt_encoder: bool = False, out: Callable[[str], None] = print) -> dict:
    """Run (or resume) the search; write ``tuned.toml``, ``tuning.json`` and ``tuning.md``; return the result.

    A head-only job (a frozen encoder) searches head-only recipes: every trial trains on the features its
    nodes computed once for the study, so a trial takes seconds. ``adapt_encoder`` also tries LoRA on the
    encoder (``lora.head-only=false``), whose trials run the encoder at every step (minutes each on a CPU).
    """
    import optuna
    from fedtune.simulations.run import simulate

    if trials < 1:
        raise FedtuneError(f"--trials {trials}: expected >= 1", "give the number of trials, e.g. --trials 12")
    if cfg.model.task != "seq-cls":
        raise FedtuneError("fedtune tune scores trials by validation macro-F1, a classification figure",
                           "tune a seq-cls job (model.task=seq-cls)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    study = _open_study(d, trials, cfg.train.seed)
    planned = int(study.user_attrs["trials"])
    fixed = fixed_keys(cfg, fixed, adapt_encoder=adapt_encoder)
    searched = [k for k in PRIVATE_SPACE + (() if cfg.privacy.enabled else SHAPE_SPACE) if k not in fixed]
    out(f"fedtune tune: {planned} trials; study in {d} (resumable); searching {', '.join(searched)}"
        + (f"; every trial's releases compose in each simulated node's ledger ({d / NODES}), under its ceiling "
           f"sim.node-max-epsilon={cfg.sim.node_max_epsilon:g}" if cfg.privacy.enabled else ""))
    if cfg.lora.head_only and not adapt_encoder and "lora.head-only" not in searched:
        out("  head-only recipes on the frozen encoder's features (computed once per study); --adapt-encoder "
            "also tries LoRA on the encoder (minutes per trial)")
    # fed.tracking: every trial is an MLflow run in one experiment named after the study (the store beside the trials)
    experiment = cfg.fed.tracking_experiment or f"fedtune tune {d.resolve().name}"
    tracked = {"fed.tracking-experiment": experiment} if cfg.fed.tracking else {}
    t0 = time.monotonic()
    cut_short = False
    while len([t for t in study.trials if t.state.is_finished()]) < planned:
        if timeout is not None and time.monotonic() - t0 > timeout:
            cut_short = True
            out(f"time budget of {timeout:.0f}s spent: stopping after {len(study.trials)} trials")
            break
        full = _no_room(cfg, d)
        if full:
            cut_short = True
            out(f"stopping after {len(study.trials)} trials: {full}")
            break
        trial = study.ask()
        k = trial.number
        recipe = {} if trial.user_attrs.get("default") else suggest(trial, cfg, fixed)
        run_dir = d / f"trial-{k}"
        trial_cfg = cfg.replace(**{**recipe, "fed.run-dir": str(run_dir), "fed.resume": False, **tracked})
        out(f"trial {k + 1}/{planned}: " + (", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}"
                                                       for a, b in recipe.items()) or "the scenario's recipe"))
        pruned = [False]

        def watch(line: str, trial=trial, run_dir=run_dir) -> None:
            if line.startswith("round ") and "/" in line.split()[1]:
                rounds = RunDir(run_dir).rounds()
                score = rounds[-1].server_val.get("macro_f1") if rounds else None
                if score is not None:
                    trial.report(score, rounds[-1].round)
                    if trial.should_prune():
                        pruned[0] = True
                        (run_dir / "STOP").touch()

        try:
            res = simulate(trial_cfg, out=watch, report=False, node_state=d / NODES)
        except FedtuneError as e:
            out(f"  trial {k + 1} failed: {e.problem}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        summary = RunSummary.from_json(res["summary"])
        val = summary.final_val.get("macro_f1")
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("seconds", res["seconds"])
        if pruned[0]:
            out(f"  pruned after round {summary.rounds_completed} (validation macro-F1 below the median)")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            out(f"  validation macro-F1 {val:.4f} in {res['seconds']:.0f}s")
            study.tell(trial, val if val is not None else 0.0)
    return finish(cfg, study, d, cut_short=cut_short, out=out)


def _ledgers(d: Path) -> dict[str, list]:
    """Per simulated node of the study, its counted ledger entries (every trial's releases)."""
    out: dict[str, list] = {}
    for node_dir in sorted((d / NODES).glob("node-*")):
        out[node_dir.name] = [e for lg in open_all(node_dir) for e in lg.counted]
    return out


def search_privacy(cfg: JobConfig, d: Path) -> dict[str, dict]:
    """Per simulated node: the composition of everything the search released about it (its ledger's total),
    the largest single trial's own epsilon, and the trials that released anything (failed and pruned ones too)."""
    if not cfg.privacy.enabled:
        return {}
    delta, kind = cfg.privacy.delta or accounting.DEFAULT_DELTA, cfg.privacy.accountant
    nodes = {}
    for name, entries in _ledgers(d).items():
        jobs = sorted({e.job for e in entries})
        nodes[name] = {"search_epsilon": accounting.epsilon([e.event for e in entries], delta=delta, kind=kind),
                       "one_trial_epsilon": max((accounting.epsilon([e.event for e in entries if e.job == j],
                                                                    delta=delta, kind=kind) for j in jobs), default=0.0),
                       "trials": jobs, "releases": len(entries), "delta": delta, "accountant": kind}
    return nodes


def _no_room(cfg: JobConfig, d: Path) -> str:
    """Why another trial would not fit a simulated node's ceiling ("" when it would): the composition of what the
    node released so far and of the largest trial so far. (The nodes' ledgers refuse it anyway; stopping here
    spares a trial that could not train.)"""
    if not cfg.privacy.enabled:
        return ""
    delta, kind = cfg.privacy.delta or accounting.DEFAULT_DELTA, cfg.privacy.accountant
    for name, entries in _ledgers(d).items():
        trials = {}
        for e in entries:
            trials.setdefault(e.job, []).append(e.event)
        if not trials:
            continue
        largest = max(trials.values(), key=lambda h: accounting.epsilon(h, delta=delta, kind=kind))
        after = accounting.epsilon([e.event for e in entries] + largest, delta=delta, kind=kind)
        if over_ceiling(after, cfg.sim.node_max_epsilon):
            return (f"another trial would take {name} to epsilon {after:.2f}, past its ceiling "
                    f"sim.node-max-epsilon={cfg.sim.node_max_epsilon:g} (every trial's releases compose); lower "
                    "privacy.target-epsilon for the trials, tune on proxy data you may spend freely, or raise "
                    "sim.node-max-epsilon knowingly")
    return ""


def finish(cfg: JobConfig, study, d: Path, *, cut_short: bool, out: Callable[[str], None] = print) -> dict:
    """The chosen recipe as a scenario, the search's privacy cost, the report."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise FedtuneError(f"no trial of the search in {d} completed", "look at the trials' output above; fix the "
                           "scenario so that `fedtune simulate` runs it, then run fedtune tune again")
    best = max(done, key=lambda t: t.value)
    default = next((t for t in study.trials if t.user_attrs.get("default")), None)
    chosen = cfg.replace(**{k: v for k, v in best.user_attrs["recipe"].items()})
    flat = {k: v for k, v in chosen.to_flat().items() if k not in ("fed.run-dir", "fed.resume")}
    scenario = d / "tuned.toml"
    scenario.write_text("# fedtune tune: the best recipe of " + f"{len(study.trials)} trials (validation macro-F1 "
                        f"{best.value:.4f})\n" + "".join(f"{_toml_key(k)} = {_toml(v)}\n" for k, v in flat.items()),
                        encoding="utf-8")
    planned = int(study.user_attrs["trials"])
    nodes = search_privacy(cfg, d)
    result = {
        "trials_planned": planned, "trials_run": len(study.trials), "cut_short": cut_short,
        "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
                    "recipe": t.user_attrs.get("recipe", {}), "default": bool(t.user_attrs.get("default")),
                    "seconds": t.user_attrs.get("seconds")} for t in study.trials],
        "best": {"number": best.number, "value": best.value, "recipe": best.user_attrs["recipe"],
                 "run_dir": best.user_attrs["run_dir"]},
        "default": {"number": default.number, "value": default.value} if default and default.value is not None else None,
        "privacy": {"dp": cfg.privacy.enabled,
                    "accountant": f"composition of every release of every trial ({cfg.privacy.accountant}), "
                    "read from each simulated node's ledger", "nodes": nodes,
                    "search_epsilon_max": max((n["search_epsilon"] for n in nodes.values()), default=None),
                    "ledgers": str(d / NODES)},
        "importance": _importance(study),
        "scenario": str(scenario),
    }
    write_json_atomic(d / "tuning.json", result, indent=2, default=str)
    chosen_run = RunDir(best.user_attrs["run_dir"])
    summary = chosen_run.summary()
    if summary is not None:  # the chosen run states the search's cost (its model card reads it)
        chosen_run.write_summary(replace(summary, tuning={k: result[k] for k in ("trials_planned", "trials_run",
                                                                                   "privacy")}))
    report = write_tuning_report(d, result)
    out(f"best: trial {best.number + 1}, validation macro-F1 {best.value:.4f}"
        + (f" (the scenario's recipe: {default.value:.4f})" if default and default.value is not None else ""))
    if nodes:
        out(f"privacy: epsilon of the whole search per node at most {result['privacy']['search_epsilon_max']:.3f} "
            f"(one trial: {max(n['one_trial_epsilon'] for n in nodes.values()):.3f})")
    out(f"chosen recipe: {scenario} (run it with `fedtune simulate {scenario}`); report: {report}")
    return result


def _importance(study) -> dict:
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():  # with a handful of trials fANOVA warns per parameter; the report says why
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):  # fewer than two completed trials with varying values
        return {}


def write_tuning_report(d: Path, result: dict) -> Path:
    lines = ["# fedtune tune", "", f"{len(result['trials'])} trials of {result['trials_planned']} planned"
             + (" (stopped early)" if result["cut_short"] else "") + "; scored on the server's validation split "
             "(macro-F1).", ""]
    b, dft = result["best"], result["default"]
    lines += [f"Best: trial {b['number'] + 1}, validation macro-F1 **{b['value']:.4f}**"
              + (f"; the scenario's own recipe: {dft['value']:.4f}" if dft else "") + ".", ""]
    p = result["privacy"]
    if p["dp"]:
        lines += ["## Privacy of the search", "", f"Accountant: {p['accountant']} ({p['ledgers']}). The search is "
                  "adaptive (each recipe chosen from earlier scores, trials pruned on others' scores, every trial "
                  "kept), so every trial's releases count in full, failed and pruned trials included.", "",
                  "| node | largest single trial | whole search | trials that released | delta |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {v['one_trial_epsilon']:.3f} | {v['search_epsilon']:.3f} | {len(v['trials'])} | "
                  f"{v['delta']:.2g} |" for n, v in sorted(p["nodes"].items())]
        lines.append("")
    lines += ["## Trials", "", "| trial | state | validation macro-F1 | seconds | recipe |", "|---|---|---|---|---|"]
    for t in result["trials"]:
        recipe = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["recipe"].items())
        lines.append(f"| {t['number'] + 1} | {t['state']} | {'-' if t['value'] is None else format(t['value'], '.4f')}"
                     f" | {'-' if t['seconds'] is None else format(t['seconds'], '.0f')} | "
                     f"{recipe or ('the scenario' if t['default'] else '')} |")
    if result["importance"]:
        _importance_plot(d / "importance.png", result["importance"])
        done = sum(t["state"] == "complete" for t in result["trials"])
        lines += ["", "## Parameter importance (fANOVA)", "", "![importance](importance.png)", "",
                  f"Estimated from {done} completed trials: with fewer than about 20 it is a rough indication.", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in result["importance"].items()]
    out = d / "tuning.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _importance_plot(path: Path, importance: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.4 * len(importance)), dpi=100)
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names])
    ax.set_xlabel("importance for validation macro-F1")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _toml_key(k: str) -> str:
    return f'"{k}"'


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)

