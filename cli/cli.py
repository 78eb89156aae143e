"""``fedtune``: the command line. User errors become one message and a non-zero exit.

    fedtune local [--data FILE] [--state-dir DIR] [--out DIR] [key=value ...]
    fedtune evaluate --adapter DIR [--data FILE] [key=value ...]
    fedtune ledger [--state-dir DIR] [--json]
    fedtune export RUN_DIR --out DIR [--round K]
    fedtune registry add|list|show|compare|promote|rollback|verify ... [--registry DIR]
    fedtune predict [FILE|-] (--model DIR | --registry DIR [--version V]) [--out FILE]
    fedtune drift --data FILE (--model DIR | --registry DIR)
    fedtune config
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from fedtune.common.errors import FedtuneError

DEFAULT_STATE_DIR = "fedtune-state"
PACKAGED_SOURCE = "bbc-news (packaged)"


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
    from fedtune.common.training.config import load_config, parse_overrides

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
    from fedtune.common.privacy.accounting import DP_OFF_WARNING
    from fedtune.common.training import adapter
    from fedtune.common.training import node as node_mod

    if not cfg.privacy.enabled:
        print(f"WARNING: {DP_OFF_WARNING}", file=sys.stderr, flush=True)
    from fedtune.common.privacy.accounting import DEFAULT_DELTA

    t0 = time.perf_counter()
    source = args.source or (str(Path(cfg.data.path).expanduser().resolve()) if cfg.data.path else PACKAGED_SOURCE)
    policy = node_mod.NodePolicy(source=source, max_epsilon=max_eps, delta=cfg.privacy.delta or DEFAULT_DELTA,
                                 accountant=cfg.privacy.accountant, evaluate=False)
    print(f"fedtune local: loading data ({cfg.data.path or 'BBC News (packaged)'}) and model "
          f"({cfg.model.path or 'all-MiniLM-L6-v2 (packaged)'}) ...", flush=True)
    node = node_mod.prepare(cfg, policy, state_dir=args.state_dir)
    job = f"local-{time.strftime('%Y%m%d-%H%M%S')}"
    lm = node.lora
    print(f"  records: train {len(node.train_set)}, val {len(node.val_set)}, test {len(node.test_set)}; "
          f"labels: {', '.join(node.splits.labels) or '(causal LM)'}")
    print(f"  LoRA r={cfg.lora.r}{' (FFA-LoRA)' if cfg.lora.ffa else ''}: {lm.trainable_parameters():,} trainable of "
          f"{lm.total_parameters():,} parameters")
    if cfg.privacy.enabled:
        spent = node.ledger.spent()
        jp = node_mod.job_plan(node, job, federated=False)
        print(f"  DP-SGD: noise multiplier {jp.noise_multiplier:.3f}, clip {cfg.privacy.max_grad_norm}, "
              f"sample rate {node.plan.sample_rate:.4f}, {node.plan.total_steps} steps -> epsilon "
              f"{node_mod.planned_epsilon(node, job, federated=False):.2f} at delta {policy.delta:.2g} "
              f"({policy.accountant})")
        print(f"  ledger of data source {source!r}: {node.ledger.path} (spent so far {spent:.3f} of ceiling "
              f"{max_eps:g})")
    if args.init_adapter:
        adapter.load_adapter_dir(lm.model, args.init_adapter)
        print(f"  starting from adapter {args.init_adapter}")
    out = Path(args.out or Path("runs") / job)
    result = None
    for rnd in range(1, cfg.train.rounds + 1):
        result = node_mod.train_round(node, job=job, round=rnd, progress=_progress_printer(f"round {rnd}"),
                                      federated=False)
    assert result is not None
    print(f"  trained {result.stats.steps * cfg.train.rounds} steps in {time.perf_counter() - t0:.0f}s; "
          f"epsilon spent on this data source: {result.epsilon_spent:.3f} (delta {result.delta:.2g})")
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

    from fedtune.common.training import adapter
    from fedtune.common.training import node as node_mod
    from fedtune.common.training.config import load_config, parse_overrides

    cfg = load_config(parse_overrides(args.settings))
    if args.data:
        cfg = cfg.replace(**{"data.path": args.data})
    adapter.read_adapter_file(args.adapter)  # fail fast on a missing or corrupt file, before loading the model
    with tempfile.TemporaryDirectory() as scratch:  # the organization's own look at its data: nothing is released
        policy = node_mod.NodePolicy(source="local evaluation", max_epsilon=math.inf)
        node = node_mod.prepare(cfg, policy, state_dir=scratch, for_training=False)
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
    from fedtune.common.privacy.ledger import legacy_files, open_all

    ledgers = open_all(args.state_dir)
    legacy = legacy_files(args.state_dir)
    if args.json:
        print(json.dumps([lg.summary() | {"entries": [e.__dict__ for e in lg.entries]} for lg in ledgers], indent=2))
        return 0
    if not ledgers and not legacy:
        print(f"no privacy ledger under {Path(args.state_dir) / 'ledger'}: nothing has been released from this node")
        return 0
    for lg in ledgers:
        s = lg.summary()
        print(f"data source {s['source']!r}  ({s['n_records']} records at the last release)  ledger {s['path']}")
        print(f"  epsilon spent {s['epsilon_spent']:.4f} of ceiling {s['max_epsilon']:g}   delta {s['delta']:.3g}   "
              f"accountant {s['accountant']}   releases {s['train_releases']} training + {s['eval_releases']} "
              f"evaluation   steps {s['steps']}")
        if s["imported"]:
            print(f"  includes the releases of fedtune 0.1 ledgers: {', '.join(s['imported'])}")
        previous = None
        for e in lg.entries:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
            what = (f"{e.steps} steps, noise {e.noise_multiplier:.4f}, sample rate {e.sample_rate:.5f}"
                    if e.kind == "train" else f"evaluation answer, noise {e.noise_multiplier:.3f}")
            note = f"  [{e.status}]" if e.status != "settled" else ""
            if previous is not None and e.fingerprint != previous:
                note += "  [the data's content changed before this release: same source, same budget]"
            previous = e.fingerprint
            print(f"  {stamp}  job {e.job} round {e.round}: {what} -> epsilon {e.epsilon_after:.4f}{note}")
    for p in legacy:
        print(f"{p}: a fedtune 0.1 ledger; its releases count in this node's first source ledger at its next release")
    return 0


def _sim_config(args: argparse.Namespace, default_scenario: str | None):
    from fedtune.common.training.config import load_config, parse_overrides
    from fedtune.simulations.run import read_scenario

    if args.scenario and "=" in args.scenario:  # `fedtune demo key=value`: no scenario given
        args.settings, args.scenario = [args.scenario, *args.settings], None
    settings = read_scenario(args.scenario) if args.scenario else (
        read_scenario(default_scenario) if default_scenario else {})
    settings.update(parse_overrides(args.settings))
    if args.run_dir:
        settings["fed.run-dir"] = args.run_dir
    return load_config(settings)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedtune.simulations.run import simulate

    res = simulate(_sim_config(args, None))
    _print_final(res["summary"])
    return 0


def _print_final(summary: dict) -> None:
    t = ((summary.get("final") or {}).get("test")) or {}
    if "accuracy" in t:
        print(f"final global adapter: test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}")


def cmd_baselines(args: argparse.Namespace) -> int:
    """A federated DP run plus baselines on the same split; the table lands in its report."""
    from fedtune.simulations import baselines
    from fedtune.simulations.report import baseline_table, write_report
    from fedtune.simulations.run import simulate

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
    print(f"next: ship it with `fedtune registry add {run_dir} --registry models --promote` (docs/serving.md)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Make a federation's CA + SuperLink certificate, and/or SuperNode key pairs."""
    from fedtune.common.operations import keys as pki

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


def cmd_node(args: argparse.Namespace) -> int:
    from fedtune.client import supernode

    config = supernode.read_node_config(args.config)
    return supernode.run(superlink=args.superlink, ca=args.ca, key=args.key, config=config, port=args.port,
                         retries=args.max_retries, max_wait=args.max_wait_time)


def cmd_superlink(args: argparse.Namespace) -> int:
    from fedtune.server import superlink

    return superlink.run(keys=args.keys, database=args.database, host=args.host, port=args.port,
                         control_port=args.control_port, log_file=args.log)


def cmd_status(args: argparse.Namespace) -> int:
    from fedtune.common.operations.monitoring import run_view, status_table

    view = run_view(args.run_dir)
    if args.json:
        print(json.dumps({k: v for k, v in view.items() if k != "config"}, indent=2, default=str))
    else:
        print(status_table(view))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn
    from fedtune.server.dashboard import create_app

    root = Path(args.root)
    if not root.is_dir():
        raise FedtuneError(f"{root} is not a directory", "give a run directory or the directory holding runs")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise FedtuneError(f"cannot read --token-file {args.token_file} ({e.__class__.__name__})",
                               "write a long random token into it, e.g. `openssl rand -hex 32 > token`") from None
        if len(token) < 16:
            raise FedtuneError(f"the token in {args.token_file} is too short ({len(token)} characters)",
                               "use at least 16 random characters, e.g. `openssl rand -hex 32 > token`")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise FedtuneError("--tls-cert and --tls-key go together", "give both (e.g. fed-keys/server.crt and .key)")
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not (args.tls_cert and token):
        if not args.insecure:
            raise FedtuneError(
                f"refusing to serve the dashboard on {args.host} without TLS and a token: anyone who can reach it "
                "would read every run's figures", "give --tls-cert/--tls-key (e.g. from `fedtune keys`) and "
                "--token-file, keep the default --host 127.0.0.1, or pass --insecure knowingly")
        print(f"WARNING: --insecure: the dashboard on {args.host} is served without "
              f"{'TLS' if not args.tls_cert else ''}{' and ' if not args.tls_cert and not token else ''}"
              f"{'a token' if not token else ''}: anyone who can reach it sees every run's figures",
              file=sys.stderr, flush=True)
    scheme = "https" if args.tls_cert else "http"
    print(f"fedtune dashboard on {scheme}://{args.host}:{args.port}/ over {root.resolve()} (read-only"
          f"{', token required' if token else ''}; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(root, token=token), host=args.host, port=args.port, log_level="warning",
                ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.common.serving.export import export_run

    rec = export_run(args.run_dir, args.out, round=args.round, name_nodes=args.name_nodes, base_model=args.base_model,
                     progress=_say)
    _print_export_summary(rec, Path(args.out))
    return 0


def _print_export_summary(rec: dict, where: Path) -> None:
    from fedtune.common.serving.modelcard import privacy_summary

    test = rec["metrics"].get("test") or {}
    ps = privacy_summary(rec)
    print(f"{where}: model of run {rec['source']['run']} after round {rec['source']['round']} "
          f"({rec['source']['checkpoint']})")
    if "accuracy" in test:
        print(f"  test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} (n={test['n']})")
    if ps["dp"]:
        print(f"  privacy: sample-level DP per node dataset, epsilon <= {ps['epsilon_max']:.3f} at delta "
              f"{ps['delta_max']:.3g} ({ps['accountant']}) over {ps['nodes']} nodes; secure aggregation "
              f"{'on' if ps['secure_aggregation'] else 'off'}")
    else:
        print("  privacy: NO differential privacy (see the model card)")
    print(f"  model card: {where / 'README.md'}; weights sha256 {rec['weights_sha256'][:16]}...")


def _registry(args: argparse.Namespace):
    from fedtune.common.serving.registry import Registry

    return Registry(args.registry)


def cmd_registry(args: argparse.Namespace) -> int:
    from fedtune.common.serving.registry import compare

    reg = _registry(args)
    if args.action == "add":
        if not args.version:
            raise FedtuneError("registry add needs the run directory to export",
                               "run `fedtune registry add RUN_DIR [--round K]`")
        e = reg.add(args.version, round=args.round, name_nodes=args.name_nodes, base_model=args.base_model,
                    note=args.note or "", progress=_say)
        print(f"added {e['id']} (run {e['source_run']}, {e['checkpoint']}, round {e['source_round']}) to {reg.path}")
        if args.promote:
            reg.promote(e["id"])
            print(f"promoted {e['id']} as current")
        else:
            print(f"promote it with `fedtune registry promote {e['id']} --registry {reg.path}`")
        return 0
    if args.action == "list":
        vs = reg.versions()
        if args.json:
            print(json.dumps(vs, indent=2))
            return 0
        if not vs:
            print(f"registry {reg.path} has no versions yet (add one with `fedtune registry add RUN_DIR`)")
            return 0
        print(f"{'':2}{'version':<8} {'created':<17} {'source':<28} {'test acc':>8} {'macro-F1':>8} "
              f"{'worst node':>10} {'epsilon':>8} {'secagg':>6}  note")
        for v in vs:
            m, pr = v["metrics"], v["privacy"]
            src = f"{v['source_run']}/{v['checkpoint']}"
            print(f"{'*' if v['current'] else ' ':2}{v['id']:<8} "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(v['created'])):<17} {src[:28]:<28} "
                  f"{_num(m['test_accuracy']):>8} {_num(m['test_macro_f1']):>8} {_num(m['worst_node_accuracy']):>10} "
                  f"{_num(pr['epsilon_max'], '.3f') if pr['dp'] else 'no DP':>8} "
                  f"{'on' if pr['secure_aggregation'] else 'off':>6}  "
                  + "; ".join(x for x in ("rolled back" if v.get("rolled_back") and not v["current"] else "",
                                          v["note"]) if x))
        print("(* = current)")
        return 0
    if args.action == "show":
        e = reg.entry(args.version)
        print(json.dumps(e, indent=2))
        return 0
    if args.action == "compare":
        if not (args.version and args.other):
            raise FedtuneError("registry compare needs two versions", "run `fedtune registry compare v1 v2`")
        a, b = reg.entry(args.version), reg.entry(args.other)
        rows = compare(a, b)
        if args.json:
            print(json.dumps([{"metric": k, args.version: x, args.other: y, "delta": d} for k, x, y, d in rows],
                             indent=2))
            return 0
        print(f"{'metric':<26} {a['id']:>10} {b['id']:>10} {'delta':>9}")
        for k, x, y, d in rows:
            print(f"{k:<26} {_num(x):>10} {_num(y):>10} {'' if d is None else format(d, '+.4f'):>9}")
        return 0
    if args.action == "promote":
        if not args.version:
            raise FedtuneError("registry promote needs a version", "run `fedtune registry promote VERSION`")
        st = reg.promote(args.version)
        prev = st["history"][-1] if st["history"] else None
        print(f"current version: {st['current']}" + (f" (was {prev}; `fedtune registry rollback` restores it)"
                                                     if prev and prev != st["current"] else ""))
        return 0
    if args.action == "rollback":
        st = reg.rollback()
        print(f"rolled back: current version is {st['current']} again")
        return 0
    if args.action == "verify":
        ids = [args.version] if args.version else [v["id"] for v in reg.versions()]
        for vid in ids:
            reg.verify(vid)
            print(f"{vid}: every file matches its recorded sha256")
        return 0
    raise AssertionError(args.action)


def _num(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _check_model_args(args: argparse.Namespace) -> None:
    if bool(args.model) == bool(args.registry):
        raise FedtuneError("say which model to use: --model DIR or --registry DIR (not both)",
                           "pass --model with an exported directory, or --registry (current version, or --version V)")


def _classifier(args: argparse.Namespace):
    from fedtune.common.serving.inference import Classifier

    _check_model_args(args)
    kw = {"batch_size": args.batch_size, "max_length": args.max_length}
    if args.registry:
        return Classifier.from_registry(args.registry, args.version, **kw)
    return Classifier(args.model, **kw)


def cmd_predict(args: argparse.Namespace) -> int:
    from fedtune.common.serving.inference import (
        format_predictions,
        label_inputs,
        progress_printer,
        read_inputs,
        write_output,
    )

    _check_model_args(args)
    inputs = read_inputs(args.input, text_column=args.text_column, on_bad_bytes=args.on_bad_bytes)
    fmt = args.format or ("jsonl" if args.out and Path(args.out).suffix.lower() in (".jsonl", ".json") else "csv")
    t0 = time.perf_counter()
    clf = _classifier(args)
    _say(f"loaded {clf.directory} ({len(clf.labels)} labels) in {time.perf_counter() - t0:.1f}s; labelling "
         f"{sum(i.text is not None for i in inputs)} of {len(inputs)} inputs in batches of {clf.batch_size}")
    t1 = time.perf_counter()
    preds = label_inputs(clf, inputs, None if args.quiet else progress_printer())
    took = time.perf_counter() - t1
    write_output(format_predictions(inputs, preds, clf.labels, fmt=fmt, include_text=args.include_text), args.out)
    counts: dict[str, int] = {}
    for p in preds:
        counts[p.status] = counts.get(p.status, 0) + 1
    n = counts.get("ok", 0) + counts.get("replaced-bytes", 0)
    _say(f"labelled {n} texts in {took:.1f}s ({n / took if took > 0 else 0:.0f}/s); statuses: "
         + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + (f"; written to {args.out}" if args.out else ""))
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from fedtune.common.serving import drift

    clf = _classifier(args)
    records = drift.read_labelled(args.data, clf, text_column=args.text_column, label_column=args.label_column)
    report = drift.check(clf, records.texts, records.labels, threshold=args.threshold)
    if args.report:
        from fedtune.common.serving.inference import write_output

        write_output(json.dumps(report, indent=2) + "\n", args.report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(drift.report_lines(report)))
    return 4 if report["verdict"] == "drift" else 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedtune.common.training.config import describe

    for key, typ, default, help_ in describe():
        print(f"{key:<28} {typ:<6} {default!s:<10} {help_}")
    return 0


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round", type=int, help="export this round's checkpoint instead of the final adapter")
    p.add_argument("--name-nodes", action="store_true", help="name the participating nodes in the model card "
                   "(default: counts only)")
    p.add_argument("--base-model", help="the base model directory on this machine, if not the run's model.path")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated, differentially private LoRA fine-tuning.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)

    lp = sub.add_parser("local", help="train and evaluate one node on a file or the packaged BBC News data")
    lp.add_argument("--data", help="CSV, JSONL or Parquet file (default: packaged BBC News)")
    lp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="node state directory holding the privacy ledger")
    lp.add_argument("--max-epsilon", default="10", help="this node's privacy ceiling on the data source (default 10)")
    lp.add_argument("--source", help="name of the data source whose budget this spends (default: the resolved "
                    "--data path); a new name starts a new budget")
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

    np_ = sub.add_parser("node", help="an organization: start this node's SuperNode (TLS, node authentication, "
                         "only the installed fedtune app)")
    np_.add_argument("--superlink", required=True, help="the operator's SuperLink, HOST:PORT")
    np_.add_argument("--ca", required=True, help="the federation's CA certificate (ca.crt from the operator)")
    np_.add_argument("--key", required=True, help="this node's private key (`fedtune keys node`)")
    np_.add_argument("--config", required=True, help="this node's config file (TOML; keys in docs/deployment.md)")
    np_.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's ClientApp API "
                     "(127.0.0.1; default 9094)")
    np_.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts "
                     "(default: Flower's, retry forever)")
    np_.add_argument("--max-wait-time", type=float, help="give up reconnecting after this many seconds")
    np_.set_defaults(func=cmd_node)

    lp_ = sub.add_parser("superlink", help="the operator: start the SuperLink with its Control API on this host "
                         "only and a Fleet gateway for SuperNodes")
    lp_.add_argument("--keys", required=True, help="directory of `fedtune keys init` (ca.crt, server.crt/.key)")
    lp_.add_argument("--database", required=True, help="SuperLink state file (registrations and runs persist)")
    lp_.add_argument("--host", default="0.0.0.0", help="address SuperNodes reach (default all interfaces)")
    lp_.add_argument("--port", type=int, default=9092, help="Fleet gateway port for SuperNodes (default 9092)")
    lp_.add_argument("--control-port", type=int, default=9093, help="the SuperLink's own port on 127.0.0.1 "
                     "(Control API for flwr; default 9093)")
    lp_.add_argument("--log", help="append the SuperLink's log to this file")
    lp_.set_defaults(func=cmd_superlink)

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
    dp.add_argument("--tls-cert", help="serve HTTPS with this certificate (needed off this host)")
    dp.add_argument("--tls-key", help="the certificate's private key")
    dp.add_argument("--token-file", help="require this token (file content) on every request (needed off this host)")
    dp.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS and a token")
    dp.set_defaults(func=cmd_dashboard)

    xp = sub.add_parser("export", help="export a run's model: merged model + PEFT adapter + model card")
    xp.add_argument("run_dir", help="run directory written by the server")
    xp.add_argument("--out", required=True, help="new directory to write (never overwritten)")
    _export_options(xp)
    xp.set_defaults(func=cmd_export)

    rp = sub.add_parser("registry", help="versions of exported models: add, list, compare, promote, rollback, verify")
    rp.add_argument("action", choices=["add", "list", "show", "compare", "promote", "rollback", "verify"])
    rp.add_argument("version", nargs="?", help="add: the run directory; show/promote/verify: a version id; "
                    "compare: the first version")
    rp.add_argument("other", nargs="?", help="compare: the second version")
    rp.add_argument("--registry", default=os.environ.get("FEDTUNE_REGISTRY", "registry"),
                    help="registry directory (default $FEDTUNE_REGISTRY or ./registry)")
    _export_options(rp)
    rp.add_argument("--note", help="add: a note kept with the version")
    rp.add_argument("--promote", action="store_true", help="add: promote the new version at once")
    rp.add_argument("--json", action="store_true", help="list/compare: machine-readable output")
    rp.set_defaults(func=cmd_registry)

    for name, text in (("predict", "label texts (file, or - for stdin) with an exported model or registry version"),
                       ("drift", "evaluate the model on fresh local labelled data; compare with its export figures")):
        pp = sub.add_parser(name, help=text)
        if name == "predict":
            pp.add_argument("input", nargs="?", default="-", help="text file (one text per line), .csv/.jsonl/"
                            ".parquet with --text-column, or - for stdin (default)")
            pp.add_argument("--out", help="output file (default stdout); .jsonl/.json -> JSON Lines")
            pp.add_argument("--format", choices=["csv", "jsonl"], help="output format (default from --out, else csv)")
            pp.add_argument("--on-bad-bytes", default="error", choices=["error", "replace", "skip"],
                            help="a line that is not UTF-8: stop (default), label it with U+FFFD, "
                            "or leave it unlabelled")
            pp.add_argument("--include-text", action="store_true", help="repeat each text in the output")
            pp.add_argument("--quiet", action="store_true", help="no progress lines")
        else:
            pp.add_argument("--data", required=True, help="CSV, JSONL or Parquet file of labelled records")
            pp.add_argument("--label-column", default="label")
            pp.add_argument("--threshold", type=float, default=0.05,
                            help="absolute drop in accuracy or macro-F1 reported as drift (default 0.05)")
            pp.add_argument("--json", action="store_true", help="print the report as JSON")
            pp.add_argument("--report", help="also write the JSON report to this local file")
        pp.add_argument("--model", help="an exported model directory")
        pp.add_argument("--registry", help="a registry directory (uses its current version unless --version)")
        pp.add_argument("--version", help="with --registry: this version instead of the current one")
        pp.add_argument("--text-column", default="text", help="column holding the text (table inputs)")
        pp.add_argument("--batch-size", type=int, default=32)
        pp.add_argument("--max-length", type=int, help="tokens per text (default: as trained)")
        pp.set_defaults(func=cmd_predict if name == "predict" else cmd_drift)

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
