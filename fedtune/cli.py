"""``fedtune``: the command line. User errors become one message and a non-zero exit.

    fedtune local [--data FILE] [--state-dir DIR] [--out DIR] [key=value ...]
    fedtune evaluate --adapter DIR [--data FILE] [key=value ...]
    fedtune ledger [--state-dir DIR] [--json]
    fedtune config
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from common.errors import FedtuneError

DEFAULT_STATE_DIR = "fedtune-state"


def _progress_printer(label: str):
    start = time.perf_counter()
    last = [0.0]

    def show(step: int, total: int, loss: float) -> None:
        now = time.perf_counter() - start
        if step == total or step == 1 or now - last[0] >= 10 or step % max(1, total // 10) == 0:
            last[0] = now
            eta = now / step * (total - step)
            print(f"[{label}] step {step}/{total}  loss {loss:.4f}  {now:.0f}s elapsed, ~{eta:.0f}s left", flush=True)

    return show


def cmd_local(args: argparse.Namespace) -> int:
    from common.config import load_config, parse_overrides

    cfg = load_config(parse_overrides(args.settings))
    if args.data:
        cfg = cfg.replace(**{"data.path": args.data})
    max_eps = float(args.max_epsilon)
    if not cfg.privacy.enabled and math.isfinite(max_eps):
        raise FedtuneError(
            "privacy.enabled=false would release a model with no privacy guarantee, but this node's ceiling is "
            f"epsilon {max_eps:g}",
            "pass --max-epsilon inf to allow non-private training on this data (the ledger then records an "
            "infinite spend for it), or keep DP on",
        )
    from common import adapter, node as node_mod

    t0 = time.perf_counter()
    print(f"fedtune local: loading data ({cfg.data.path or 'BBC News (packaged)'}) and model "
          f"({cfg.model.path or 'all-MiniLM-L6-v2 (packaged)'}) ...", flush=True)
    node = node_mod.prepare(cfg, state_dir=args.state_dir, max_epsilon=max_eps, delta=cfg.privacy.delta)
    lm = node.lora
    print(f"  records: train {len(node.train_set)}, val {len(node.val_set)}, test {len(node.test_set)}; "
          f"labels: {', '.join(node.splits.labels) or '(causal LM)'}")
    print(f"  LoRA r={cfg.lora.r}{' (FFA-LoRA)' if cfg.lora.ffa else ''}: {lm.trainable_parameters():,} trainable of "
          f"{lm.total_parameters():,} parameters")
    if cfg.privacy.enabled:
        print(f"  DP-SGD: noise multiplier {node.noise_multiplier:.3f}, clip {cfg.privacy.max_grad_norm}, "
              f"sample rate {node.plan.sample_rate:.4f}, {node.plan.total_steps} steps -> epsilon "
              f"{node_mod.planned_epsilon(node):.2f} at delta {node.ledger.delta:.2g} ({cfg.privacy.accountant})")
        print(f"  ledger: {node.ledger.path} (spent so far {node.ledger.spent():.3f} of ceiling {max_eps:g})")
    if args.init_adapter:
        adapter.load_adapter_dir(lm.model, args.init_adapter)
        print(f"  starting from adapter {args.init_adapter}")
    job = f"local-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out or Path("runs") / job)
    result = None
    for rnd in range(1, cfg.train.rounds + 1):
        result = node_mod.train_round(node, job=job, round=rnd, progress=_progress_printer(f"round {rnd}"))
    assert result is not None
    print(f"  trained {result.stats.steps * cfg.train.rounds} steps in {time.perf_counter() - t0:.0f}s; "
          f"epsilon spent on this dataset: {result.epsilon_spent:.3f} (delta {result.delta:.2g})")
    metrics = {"val": node_mod.evaluate_split(node, "val"), "test": node_mod.evaluate_split(node, "test")}
    adapter.save_adapter(lm.model, out / "adapter")
    (out / "config.json").write_text(json.dumps(cfg.to_flat(), indent=2) + "\n")
    summary = {"job": job, "metrics": metrics, "privacy": {**node.ledger.summary(), "dp": cfg.privacy.enabled},
               "seconds": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    test = metrics["test"]
    if cfg.model.task == "seq-cls":
        print(f"test: accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}, loss {test['loss']:.4f} "
              f"(n={test['n']})")
        for lab, m in test["per_class"].items():
            print(f"  {lab:>16}: precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f} "
                  f"(n={m['support']})")
    else:
        print(f"test: loss {test['loss']:.4f}, perplexity {test['perplexity']:.2f} (n={test['n']})")
    print(f"adapter saved to {out / 'adapter'} (load with peft.PeftModel.from_pretrained); metrics in "
          f"{out / 'metrics.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from common import adapter, node as node_mod
    from common.config import load_config, parse_overrides

    cfg = load_config(parse_overrides(args.settings))
    if args.data:
        cfg = cfg.replace(**{"data.path": args.data})
    adapter.read_adapter_file(args.adapter)  # fail fast on a missing or corrupt file, before loading the model
    with tempfile.TemporaryDirectory() as scratch:  # evaluation spends no budget: no ledger is written
        node = node_mod.prepare(cfg, state_dir=scratch, max_epsilon=math.inf, for_training=False)
        adapter.load_adapter_dir(node.lora.model, args.adapter)
        metrics = node_mod.evaluate_split(node, args.split)
    if args.json:
        print(json.dumps(metrics, indent=2))
    elif cfg.model.task == "seq-cls":
        print(f"{args.split}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
              f"loss {metrics['loss']:.4f} (n={metrics['n']})")
    else:
        print(f"{args.split}: loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f} (n={metrics['n']})")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    from common.ledger import open_all

    ledgers = open_all(args.state_dir)
    if args.json:
        print(json.dumps([lg.summary() | {"entries": [e.__dict__ for e in lg.entries]} for lg in ledgers], indent=2))
        return 0
    if not ledgers:
        print(f"no privacy ledger under {Path(args.state_dir) / 'ledger'}: nothing has been trained on this node")
        return 0
    for lg in ledgers:
        s = lg.summary()
        print(f"dataset {s['dataset_id'][:16]}  ({s['n_records']} records)  ledger {s['path']}")
        print(f"  epsilon spent {s['epsilon_spent']:.4f} of ceiling {s['max_epsilon']:g}   delta {s['delta']:.3g}   "
              f"accountant {s['accountant']}   releases {s['releases']}   steps {s['steps']}")
        for e in lg.entries:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
            print(f"  {stamp}  job {e.job} round {e.round}: {e.steps} steps, noise {e.noise_multiplier:.4f}, "
                  f"sample rate {e.sample_rate:.5f} -> epsilon {e.epsilon_after:.4f}")
    return 0


def _sim_config(args: argparse.Namespace, default_scenario: str | None):
    from common.config import load_config, parse_overrides
    from simulations.run import read_scenario

    if args.scenario and "=" in args.scenario:  # `fedtune demo key=value`: no scenario given
        args.settings, args.scenario = [args.scenario, *args.settings], None
    settings = read_scenario(args.scenario) if args.scenario else (
        read_scenario(default_scenario) if default_scenario else {})
    settings.update(parse_overrides(args.settings))
    if args.run_dir:
        settings["fed.run-dir"] = args.run_dir
    return load_config(settings)


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.run import simulate

    res = simulate(_sim_config(args, None))
    _print_final(res["summary"])
    return 0


def _print_final(summary: dict) -> None:
    t = ((summary.get("final") or {}).get("test")) or {}
    if "accuracy" in t:
        print(f"final global adapter: test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}")


def cmd_baselines(args: argparse.Namespace) -> int:
    """A federated DP run plus baselines on the same split; the table lands in its report."""
    from simulations import baselines
    from simulations.report import baseline_table, write_report
    from simulations.run import simulate

    cfg = _sim_config(args, "demo" if args.command == "demo" else None)
    t0 = time.perf_counter()
    fed = simulate(cfg, report=False)
    run_dir = Path(fed["run_dir"])
    rows = [baselines.federated_row(fed["summary"], name="federated, DP (this run)", seconds=fed["seconds"])]
    if args.command == "baselines" or getattr(args, "full", False):
        nodp = cfg.replace(**{"privacy.enabled": False, "sim.node-max-epsilon": math.inf,
                              "fed.run-dir": str(run_dir) + "-nodp"})
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = simulate(nodp, report=False)
        rows.append(baselines.federated_row(res["summary"], name="federated, no DP", seconds=res["seconds"]))
    rows.append(baselines.centralized(cfg, dp=True))
    rows.append(baselines.centralized(cfg, dp=False))
    rows.append(baselines.local_only(cfg))
    (run_dir / "baselines.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    report = write_report(run_dir)
    print()
    print("\n".join(baseline_table(rows)))
    print(f"\nall done in {time.perf_counter() - t0:.0f}s; report: {report}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Make a federation's CA + SuperLink certificate, and/or SuperNode key pairs."""
    from common import pki

    out = Path(args.out)
    made = []
    if args.action == "init":
        made += pki.make_ca(out, force=args.force)
        made += pki.make_server_cert(out, hosts=args.host or ["127.0.0.1", "localhost"], force=args.force)
    for name in args.node or []:
        made += pki.make_node_keys(out / "nodes", name, force=args.force)
    for p in made:
        mode = oct(p.stat().st_mode & 0o777)
        print(f"wrote {p} ({mode})")
    if args.action == "init":
        print(f"SuperLink: --ssl-ca-certfile {out / 'ca.crt'} --ssl-certfile {out / 'server.crt'} "
              f"--ssl-keyfile {out / 'server.key'}")
        print(f"SuperNodes get {out / 'ca.crt'} (as --root-certificates) and their own nodes/<name>.key; "
              f"the operator registers nodes/<name>.pub with `flwr supernode register`")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from common.monitoring import run_view, status_table

    view = run_view(args.run_dir)
    if args.json:
        print(json.dumps({k: v for k, v in view.items() if k != "config"}, indent=2, default=str))
    else:
        print(status_table(view))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from server.dashboard import create_app

    root = Path(args.root)
    if not root.is_dir():
        raise FedtuneError(f"{root} is not a directory", "give a run directory or the directory holding runs")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: the dashboard listens on {args.host}: anyone who can reach it sees run figures "
              "(it has no login); put it behind your own authentication")
    print(f"fedtune dashboard on http://{args.host}:{args.port}/ over {root.resolve()} (read-only; Ctrl-C stops)")
    uvicorn.run(create_app(root), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from common.config import describe

    for key, typ, default, help_ in describe():
        print(f"{key:<28} {typ:<6} {default!s:<10} {help_}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated, differentially private LoRA fine-tuning.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)

    lp = sub.add_parser("local", help="train and evaluate one node on a file or the packaged BBC News data")
    lp.add_argument("--data", help="CSV, JSONL or Parquet file (default: packaged BBC News)")
    lp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="node state directory holding the privacy ledger")
    lp.add_argument("--max-epsilon", default="10", help="this node's privacy ceiling on the dataset (default 10)")
    lp.add_argument("--out", help="output directory (default runs/local-<time>)")
    lp.add_argument("--init-adapter", help="start from this saved adapter directory")
    lp.add_argument("settings", nargs="*", help="job settings as key=value (see `fedtune config`)")
    lp.set_defaults(func=cmd_local)

    ep = sub.add_parser("evaluate", help="evaluate a saved adapter on a file or the packaged data (no training)")
    ep.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    ep.add_argument("--data", help="CSV, JSONL or Parquet file (default: packaged BBC News)")
    ep.add_argument("--split", default="test", choices=["train", "val", "test"])
    ep.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ep.add_argument("settings", nargs="*", help="job settings as key=value (must match the adapter's)")
    ep.set_defaults(func=cmd_evaluate)

    gp = sub.add_parser("ledger", help="print this node's privacy ledger")
    gp.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    gp.add_argument("--json", action="store_true", help="machine-readable output")
    gp.set_defaults(func=cmd_ledger)

    for name, text in (("simulate", "run a federated job with Flower's simulation engine on this machine"),
                       ("demo", "the default demo: federated DP on non-IID BBC News, with baselines and a report"),
                       ("baselines", "a federated DP run plus every baseline on the same split")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("scenario", nargs="?", help="scenario TOML file or name in simulations/scenarios"
                        + (" (default: demo)" if name == "demo" else ""))
        sp.add_argument("--run-dir", help="run directory (default runs/sim-<time>)")
        if name == "demo":
            sp.add_argument("--full", action="store_true", help="also run federated without DP")
        sp.add_argument("settings", nargs="*", help="overrides as key=value")
        sp.set_defaults(func=cmd_simulate if name == "simulate" else cmd_baselines)

    kp = sub.add_parser("keys", help="make TLS certificates and SuperNode authentication keys")
    kp.add_argument("action", choices=["init", "node"], help="init: CA + SuperLink certificate (+ --node keys); "
                    "node: only SuperNode key pairs")
    kp.add_argument("--out", required=True, help="directory for the files (private keys are written 0600)")
    kp.add_argument("--host", action="append", help="SuperLink address for its certificate (repeatable; "
                    "default 127.0.0.1 and localhost)")
    kp.add_argument("--node", action="append", help="make a SuperNode key pair with this name (repeatable)")
    kp.add_argument("--force", action="store_true", help="overwrite existing files")
    kp.set_defaults(func=cmd_keys)

    st = sub.add_parser("status", help="print a run's rounds and nodes (privacy spent vs ceiling) as tables")
    st.add_argument("run_dir", help="a run directory written by the server")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    dp = sub.add_parser("dashboard", help="serve a read-only web dashboard and /metrics over run directories")
    dp.add_argument("root", nargs="?", default="runs", help="a run directory or a directory of runs (default runs)")
    dp.add_argument("--host", default="127.0.0.1", help="address to listen on (default localhost only)")
    dp.add_argument("--port", type=int, default=8050)
    dp.set_defaults(func=cmd_dashboard)

    cp = sub.add_parser("config", help="list every job setting with its type, default and meaning")
    cp.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value words may follow options (`fedtune simulate demo --run-dir X lora.r=4`)
    stray = [w for w in extra if "=" not in w or w.startswith("-")]
    if stray or (extra and not hasattr(args, "settings")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.settings = [*args.settings, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FedtuneError as e:
        print(f"fedtune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
