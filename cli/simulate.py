"""Commands a researcher runs: a simulated federation, the demo, baselines on the same split."""

from __future__ import annotations

import argparse
import time


def _sim_config(args: argparse.Namespace, default_scenario: str | None):
    from fedtune.common.training.config import load_config, parse_overrides
    from fedtune.simulations.run import read_scenario

    if args.scenario and "=" in args.scenario:  # `fedtune demo key=value`: no scenario given
        args.settings, args.scenario = [args.scenario, *args.settings], None
    name = args.scenario or default_scenario
    settings = read_scenario(name) if name else {}
    settings.update(parse_overrides(args.settings))
    if args.run_dir:
        settings["fed.run-dir"] = args.run_dir
    return load_config(settings)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.common.operations.rundir import RunSummary
    from fedtune.simulations.run import simulate

    t = RunSummary.from_json(simulate(_sim_config(args, None))["summary"]).final_test
    if "accuracy" in t:
        print(f"final global adapter: test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}")
    elif "perplexity" in t:
        print(f"final global adapter: test response perplexity {t['perplexity']:.2f}"
              + (f", ROUGE-L {t['rouge_l']:.4f}" if t.get("rouge_l") is not None else ""))
    return 0


def cmd_baselines(args: argparse.Namespace) -> int:
    """A federated DP run plus baselines on the same split; the table lands in its report."""
    from fedtune.simulations.baselines import run_all
    from fedtune.simulations.report import baseline_table, write_report

    cfg = _sim_config(args, "demo" if args.command == "demo" else None)
    epsilons = None
    if args.epsilons is not None:  # checked before anything runs
        from fedtune.common.operations.curve import check_job, parse_epsilons

        epsilons = parse_epsilons(args.epsilons)
        check_job(cfg.model.task, cfg.privacy.enabled)
    t0 = time.perf_counter()
    run_dir, rows = run_all(cfg, with_nodp=args.command == "baselines" or getattr(args, "full", False))
    if epsilons:
        from fedtune.common.operations.curve import table
        from fedtune.simulations.baselines import privacy_utility_curve

        curve = privacy_utility_curve(cfg, run_dir, rows, epsilons)
        print()
        print("\n".join(table(curve)))
    report = write_report(run_dir)
    print()
    print("\n".join(baseline_table(rows)))
    print(f"\nall done in {time.perf_counter() - t0:.0f}s; report: {report}")
    print(f"next: ship it with `fedtune registry add {run_dir} --registry models --promote` (docs/serving.md)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search the recipe; the overrides given on the command line stay fixed."""
    from fedtune.common.training.config import parse_overrides
    from fedtune.simulations.tune import tune

    cfg = _sim_config(args, None)
    fixed = set(parse_overrides(args.settings))
    study = args.study_dir or f"runs/tune-{time.strftime('%Y%m%d-%H%M%S')}"
    tune(cfg, trials=args.trials, directory=study, fixed=fixed, timeout=args.timeout,
         adapt_encoder=args.adapt_encoder)
    return 0


def add_parsers(sub) -> None:
    tp = sub.add_parser("tune", help="search the training recipe on your data (each trial a simulation); writes "
                        "the best as a scenario, with the search's privacy cost")
    tp.add_argument("scenario", help="scenario TOML file or name in simulations/scenarios")
    tp.add_argument("--trials", type=int, default=12, help="number of trials (default 12); with DP every trial's "
                    "releases compose in each simulated node's ledger, under sim.node-max-epsilon")
    tp.add_argument("--adapt-encoder", action="store_true", help="a head-only job searches head-only recipes "
                    "(seconds per trial, on features computed once); this also tries LoRA on the encoder "
                    "(minutes per trial on a CPU)")
    tp.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    tp.add_argument("--study-dir", help="directory of the study (default runs/tune-<time>; give an existing "
                    "one to resume)")
    tp.add_argument("--run-dir", help=argparse.SUPPRESS)
    tp.add_argument("settings", nargs="*", help="settings as key=value; these are fixed, not searched")
    tp.set_defaults(func=cmd_tune)

    for name, text in (("simulate", "run a federated job with Flower's simulation engine on this machine"),
                       ("demo", "the default demo: federated DP on non-IID BBC News, with baselines and a report"),
                       ("baselines", "a federated DP run plus every baseline on the same split")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("scenario", nargs="?", help="scenario TOML file or name in simulations/scenarios"
                        + (" (default: demo)" if name == "demo" else
                           " (default: none: fedtune's defaults and the settings given)"))
        sp.add_argument("--run-dir", help="run directory (default runs/sim-<time>)")
        if name == "demo":
            sp.add_argument("--full", action="store_true", help="also run federated without DP")
        if name != "simulate":
            sp.add_argument("--epsilons", metavar="E1,E2,...", help="also draw the privacy-utility curve: test "
                            "accuracy against epsilon for federated DP, centralized DP and local only, one run each "
                            "per epsilon (e.g. 1,2,4,8), in the report and the dashboard")
        sp.add_argument("settings", nargs="*", help="overrides as key=value")
        sp.set_defaults(func=cmd_simulate if name == "simulate" else cmd_baselines)
