"""Commands that ship and use a trained model: export, the registry, predict, drift."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fedtune.cli.output import num, progress_printer, say
from fedtune.common.errors import FedtuneError


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.common.serving.export import export_run

    rec = export_run(args.run_dir, args.out, round=args.round, name_nodes=args.name_nodes, base_model=args.base_model,
                     progress=say)
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


# -- fedtune registry <action>: one function per sub-command ---------------------------------------------
def _registry(args: argparse.Namespace):
    from fedtune.common.serving.registry import Registry

    return Registry(args.registry)


def registry_add(args: argparse.Namespace) -> int:
    reg = _registry(args)
    e = reg.add(args.run_dir, round=args.round, name_nodes=args.name_nodes, base_model=args.base_model,
                note=args.note or "", progress=say)
    print(f"added {e['id']} (run {e['source_run']}, {e['checkpoint']}, round {e['source_round']}) to {reg.path}")
    if args.promote:
        reg.promote(e["id"])
        print(f"promoted {e['id']} as current")
    else:
        print(f"promote it with `fedtune registry promote {e['id']} --registry {reg.path}`")
    return 0


def registry_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    vs = reg.versions()
    if args.json:
        print(json.dumps(vs, indent=2))
        return 0
    if not vs:
        print(f"registry {reg.path} has no versions yet (add one with `fedtune registry add RUN_DIR --registry {reg.path}`)")
        return 0
    print(f"{'':2}{'version':<8} {'created':<17} {'source':<28} {'test acc':>8} {'macro-F1':>8} "
          f"{'worst node':>10} {'epsilon':>8} {'secagg':>6}  note")
    for v in vs:
        m, pr = v["metrics"], v["privacy"]
        src = f"{v['source_run']}/{v['checkpoint']}"
        notes = ("rolled back" if v.get("rolled_back") and not v["current"] else "", v["note"])
        print(f"{'*' if v['current'] else ' ':2}{v['id']:<8} "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(v['created'])):<17} {src[:28]:<28} "
              f"{num(m['test_accuracy']):>8} {num(m['test_macro_f1']):>8} {num(m['worst_node_accuracy']):>10} "
              f"{num(pr['epsilon_max'], '.3f') if pr['dp'] else 'no DP':>8} "
              f"{'on' if pr['secure_aggregation'] else 'off':>6}  " + "; ".join(x for x in notes if x))
    print("(* = current)")
    return 0


def registry_show(args: argparse.Namespace) -> int:
    print(json.dumps(_registry(args).entry(args.version), indent=2))
    return 0


def registry_compare(args: argparse.Namespace) -> int:
    from fedtune.common.serving.registry import compare

    reg = _registry(args)
    a, b = reg.entry(args.version), reg.entry(args.other)
    rows = compare(a, b)
    if args.json:
        print(json.dumps([{"metric": k, args.version: x, args.other: y, "delta": d} for k, x, y, d in rows], indent=2))
        return 0
    print(f"{'metric':<26} {a['id']:>10} {b['id']:>10} {'delta':>9}")
    for k, x, y, d in rows:
        print(f"{k:<26} {num(x):>10} {num(y):>10} {'' if d is None else format(d, '+.4f'):>9}")
    return 0


def registry_promote(args: argparse.Namespace) -> int:
    st = _registry(args).promote(args.version)
    prev = st["history"][-1] if st["history"] else None
    print(f"current version: {st['current']}" + (f" (was {prev}; `fedtune registry rollback` restores it)"
                                                 if prev and prev != st["current"] else ""))
    return 0


def registry_rollback(args: argparse.Namespace) -> int:
    st = _registry(args).rollback()
    print(f"rolled back: current version is {st['current']} again")
    return 0


def registry_verify(args: argparse.Namespace) -> int:
    reg = _registry(args)
    for vid in [args.version] if args.version else [v["id"] for v in reg.versions()]:
        reg.verify(vid)
        print(f"{vid}: every file matches its recorded sha256")
    return 0


# -- predict and drift ------------------------------------------------------------------------------------
def _check_model_args(args: argparse.Namespace) -> None:
    if bool(args.model) == bool(args.registry):
        raise FedtuneError("say which model to use: --model DIR or --registry DIR (not both)",
                           "pass --model with an exported directory, or --registry (current version, or --revision V)")


def _classifier(args: argparse.Namespace):
    from fedtune.common.serving.inference import Classifier

    _check_model_args(args)
    kw = {"batch_size": args.batch_size, "max_length": args.max_length, "device": args.device}
    if args.registry:
        return Classifier.from_registry(args.registry, args.revision, **kw)
    return Classifier(args.model, **kw)


def cmd_predict(args: argparse.Namespace) -> int:
    from fedtune.common.serving.inference import format_predictions, label_inputs, read_inputs, write_output

    _check_model_args(args)  # before reading any input
    inputs = read_inputs(args.input, text_column=args.text_column, on_bad_bytes=args.on_bad_bytes)
    fmt = args.format or ("jsonl" if args.out and Path(args.out).suffix.lower() in (".jsonl", ".json") else "csv")
    t0 = time.perf_counter()
    clf = _classifier(args)
    say(f"loaded {clf.directory} ({len(clf.labels)} labels) in {time.perf_counter() - t0:.1f}s; labelling "
        f"{sum(i.text is not None for i in inputs)} of {len(inputs)} inputs in batches of {clf.batch_size}")
    t1 = time.perf_counter()
    progress = None if args.quiet else progress_printer("predict", unit="texts", every=2.0, stream=sys.stderr)
    preds = label_inputs(clf, inputs, progress)
    took = time.perf_counter() - t1
    write_output(format_predictions(inputs, preds, clf.labels, fmt=fmt, include_text=args.include_text), args.out)
    counts: dict[str, int] = {}
    for p in preds:
        counts[p.status] = counts.get(p.status, 0) + 1
    n = counts.get("ok", 0) + counts.get("replaced-bytes", 0)
    say(f"labelled {n} texts in {took:.1f}s ({n / took if took > 0 else 0:.0f}/s); statuses: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + (f"; written to {args.out}" if args.out else ""))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedtune.common.errors import DataError
    from fedtune.common.serving.generation import Generator

    _check_model_args(args)
    if args.prompt is not None and args.file:
        raise FedtuneError("give the prompt once: as an argument or with --file, not both",
                           "drop one of them")
    if args.file:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise DataError(f"prompt file {path} does not exist", "check --file, or pass the prompt as an argument")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text", "save the prompt as UTF-8") from None
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        if sys.stdin.isatty():
            say("reading the prompt from stdin (end with Ctrl-D)")
        prompt = sys.stdin.read()
    t0 = time.perf_counter()
    kw = {"device": args.device}
    gen = (Generator.from_registry(args.registry, args.revision, **kw) if args.registry
           else Generator(args.model, **kw))
    say(f"loaded {gen.directory} in {time.perf_counter() - t0:.1f}s")
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    gen.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, on_text=show)
    sys.stdout.write("\n")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from fedtune.common.serving import drift

    clf = _classifier(args)
    records = drift.read_labelled(args.data, clf, text_column=args.text_column, label_column=args.label_column)
    report = drift.check(clf, records.texts, records.labels, threshold=args.threshold)
    if args.report:
        from fedtune.common.serving.inference import write_output

        write_output(json.dumps(report, indent=2) + "\n", args.report)
    print(json.dumps(report, indent=2) if args.json else "\n".join(drift.report_lines(report)))
    return 4 if report["verdict"] == "drift" else 0


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round", type=int, help="export this round's checkpoint instead of the final adapter")
    p.add_argument("--name-nodes", action="store_true", help="name the participating nodes in the model card "
                   "(default: counts only)")
    p.add_argument("--base-model", help="the base model directory on this machine, if not the run's model.path")


class _DeprecatedVersion(argparse.Action):
    """``--version V`` after predict, drift or generate: the old spelling of ``--revision V`` (``fedtune --version``
    prints fedtune's own version)."""

    def __call__(self, parser, namespace, values, option_string=None):
        say(f"fedtune: warning: {parser.prog}: --version V is deprecated, use --revision V")
        setattr(namespace, self.dest, values)


def _model_options(p: argparse.ArgumentParser) -> None:
    """Which model predict, drift and generate use: an export directory, or a registry revision."""
    p.add_argument("--model", help="an exported model directory")
    p.add_argument("--registry", help="a registry directory (uses its current version unless --revision)")
    p.add_argument("--revision", metavar="V", help="with --registry: this version (e.g. v2) instead of the current one")
    p.add_argument("--version", dest="revision", action=_DeprecatedVersion, help=argparse.SUPPRESS)


def add_parsers(sub) -> None:
    xp = sub.add_parser("export", help="export a run's model: merged model + PEFT adapter + model card")
    xp.add_argument("run_dir", help="run directory written by the server")
    xp.add_argument("--out", required=True, help="new directory to write (never overwritten)")
    _export_options(xp)
    xp.set_defaults(func=cmd_export)

    rp = sub.add_parser("registry", help="versions of exported models: add, list, show, compare, promote, rollback, "
                        "verify")
    actions = rp.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, func, text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=text)
        a.add_argument("--registry", default=os.environ.get("FEDTUNE_REGISTRY", "registry"),
                       help="registry directory (default $FEDTUNE_REGISTRY or ./registry)")
        a.set_defaults(func=func)
        return a

    a = action("add", registry_add, "export a run as the next version vN (not current unless --promote)")
    a.add_argument("run_dir", help="run directory written by the server")
    _export_options(a)
    a.add_argument("--note", help="a note kept with the version")
    a.add_argument("--promote", action="store_true", help="promote the new version at once")
    a = action("list", registry_list, "versions with their figures; * marks the current one")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    action("show", registry_show, "one version's entry (default: current)").add_argument(
        "version", nargs="?", help="a version id")
    a = action("compare", registry_compare, "metric deltas between two versions")
    a.add_argument("version", help="the first version")
    a.add_argument("other", help="the second version")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    action("promote", registry_promote, "make a version current").add_argument("version", help="a version id")
    action("rollback", registry_rollback, "make the previous current version current again")
    action("verify", registry_verify, "check every file of a version (default: all) against its sha256").add_argument(
        "version", nargs="?", help="a version id")

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
            pp.add_argument("--label-column", default="label", help="column holding the label (default label)")
            pp.add_argument("--threshold", type=float, default=0.05,
                            help="absolute drop in accuracy or macro-F1 reported as drift (default 0.05)")
            pp.add_argument("--json", action="store_true", help="print the report as JSON")
            pp.add_argument("--report", help="also write the JSON report to this local file")
        _model_options(pp)
        pp.add_argument("--text-column", default="text", help="column holding the text (table inputs)")
        pp.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")
        pp.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32; memory)")
        pp.add_argument("--max-length", type=int, help="tokens per text (default: as trained)")
        pp.set_defaults(func=cmd_predict if name == "predict" else cmd_drift)

    gp = sub.add_parser("generate", help="answer a prompt with an exported causal LM (streamed to stdout)")
    gp.add_argument("prompt", nargs="?", help="the prompt (default: --file, else stdin)")
    gp.add_argument("--file", help="read the prompt from this text file")
    _model_options(gp)
    gp.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: as exported, else 64)")
    gp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gp.add_argument("--seed", type=int, help="seed for sampling (temperature > 0)")
    gp.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")
    gp.set_defaults(func=cmd_generate)
