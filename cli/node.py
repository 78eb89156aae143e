"""Commands an organization runs on its own machine: local training and evaluation, its ledger, its node, keys."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedtune.cli.output import progress_printer, say

DEFAULT_STATE_DIR = "fedtune-state"


def _job_config(args: argparse.Namespace):
    from fedtune.common.training.config import load_config, parse_overrides

    cfg = load_config(parse_overrides(args.settings))
    return cfg.replace(**{"data.path": args.data}) if args.data else cfg


def _print_metrics(split: str, m: dict, task: str, *, per_class: bool = False) -> None:
    if task == "seq-cls":
        print(f"{split}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, loss {m['loss']:.4f} "
              f"(n={m['n']})")
        for lab, c in (m["per_class"].items() if per_class else ()):
            print(f"  {lab:>16}: precision {c['precision']:.3f} recall {c['recall']:.3f} f1 {c['f1']:.3f} "
                  f"(n={c['support']})")
    else:
        print(f"{split}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f} (n={m['n']})")


def cmd_local(args: argparse.Namespace) -> int:
    from fedtune.common.training.local import train_locally

    cfg = _job_config(args)
    res = train_locally(cfg, max_epsilon=args.max_epsilon, state_dir=args.state_dir, out=args.out,
                        source=args.source, shared_content_ok=args.allow_shared_content,
                        init_adapter=args.init_adapter, say=lambda m: print(m, flush=True),
                        warn=say, progress=progress_printer)
    _print_metrics("test", res["metrics"]["test"], cfg.model.task, per_class=True)
    out = Path(res["out"])
    print(f"adapter saved to {out / 'adapter'} (load with peft.PeftModel.from_pretrained); metrics in "
          f"{out / 'metrics.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedtune.common.training.local import evaluate_locally

    cfg = _job_config(args)
    metrics = evaluate_locally(cfg, args.adapter, args.split)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_metrics(args.split, metrics, cfg.model.task)
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


def cmd_node(args: argparse.Namespace) -> int:
    from fedtune.client import supernode

    config = supernode.read_node_config(args.config)
    return supernode.run(superlink=args.superlink, ca=args.ca, key=args.key, config=config, port=args.port,
                         retries=args.max_retries, max_wait=args.max_wait_time)


def cmd_keys(args: argparse.Namespace) -> int:
    """Make a federation's CA + SuperLink certificate, and/or SuperNode key pairs."""
    from fedtune.common.errors import FedtuneError
    from fedtune.common.operations import keys

    if args.action == "fingerprint":
        return _fingerprints(args.paths)
    if not args.out:
        raise FedtuneError(f"fedtune keys {args.action} needs --out", "give the directory for the files: --out fed-keys")
    out = Path(args.out)
    made = []
    if args.action == "init":
        made += keys.make_ca(out, force=args.force)
        made += keys.make_server_cert(out, hosts=args.host or ["127.0.0.1", "localhost"], force=args.force)
    for name in args.node or []:
        made += keys.make_node_keys(out / "nodes", name, force=args.force)
    for p in made:
        print(f"wrote {p} ({oct(p.stat().st_mode & 0o777)})")
    if args.action == "init":
        print(f"SuperLink: --ssl-ca-certfile {out / 'ca.crt'} --ssl-certfile {out / 'server.crt'} "
              f"--ssl-keyfile {out / 'server.key'}")
        print(f"SuperNodes get {out / 'ca.crt'} (as --root-certificates) and their own nodes/<name>.key; "
              f"the operator registers nodes/<name>.pub with `flwr supernode register`")
    return 0


def _fingerprints(paths: list[str]) -> int:
    """Each public key's name and OpenSSH fingerprint, as an organization compares them with a peer out of band."""
    from cryptography.hazmat.primitives import serialization
    from fedtune.common.errors import FedtuneError
    from fedtune.common.secagg.protocol import fingerprint, load_roster

    if not paths:
        raise FedtuneError("fedtune keys fingerprint needs at least one path",
                           "give .pub files or an approved-peers directory or file")
    for path in paths:
        p = Path(path)
        if p.is_file() and p.suffix == ".pub":
            try:
                keys = {p.stem: serialization.load_ssh_public_key(p.read_bytes().strip())}
            except (ValueError, UnicodeDecodeError) as e:
                raise FedtuneError(f"{p} is not an OpenSSH public key ({e})", "give a .pub file fedtune keys wrote") \
                    from None
        else:
            keys = load_roster(str(p))
        for name, key in keys.items():
            print(f"{name}  {fingerprint(key)}")
    return 0


def epsilon_ceiling(text: str) -> float:
    """``--max-epsilon``: a number > 0 (``inf``: no ceiling); anything else is a usage error, not a traceback."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 8, or inf for no ceiling)") from None
    if not value > 0:  # also refuses nan, which no budget check could compare against
        raise argparse.ArgumentTypeError(f"{text!r}: a privacy ceiling must be > 0 (or inf for no ceiling)")
    return value


KEYS_INIT = """\
For the operator, once per federation. Writes into --out:
  ca.key (0600; keep it offline), ca.crt  the federation's certificate
      authority; send ca.crt to every organization (their nodes' --ca)
  server.key (0600), server.crt  the SuperLink's TLS certificate, valid for
      each --host (default 127.0.0.1 and localhost); `fedtune superlink --keys`
  nodes/NAME.key (0600), nodes/NAME.pub  with --node NAME: SuperNode key pairs,
      as `fedtune keys node` makes them
Existing files are never overwritten without --force."""

KEYS_NODE = """\
For an organization, on its own machine. Writes into --out/nodes/:
  NAME.key (OpenSSH private key, 0600)  this node's authentication key, for
      `fedtune node --key`; it never leaves this machine
  NAME.pub  the public half; send it to the operator, who registers it with
      `flwr supernode register`
No certificate: the CA and the SuperLink's certificate are `fedtune keys
init`'s. Existing files are never overwritten without --force."""

KEYS_FINGERPRINT = """\
For organizations comparing keys out of band: prints NAME and the OpenSSH
SHA256 fingerprint of each public key given (a .pub file, or a directory or
file of approved peers). Writes nothing."""


def add_parsers(sub) -> None:
    lp = sub.add_parser("local", help="train and evaluate one node on a file or the packaged BBC News data")
    lp.add_argument("--data", help="CSV, JSONL or Parquet file (default: packaged BBC News)")
    lp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="node state directory holding the privacy ledger")
    lp.add_argument("--max-epsilon", type=epsilon_ceiling, default=10.0,
                    help="this node's privacy ceiling on the data source: a number > 0, or inf (default 10)")
    lp.add_argument("--source", help="name of the data source whose budget this spends (default: one budget per "
                    "--state-dir, whatever file is read); a new name starts a new budget, and records already "
                    "released under another name are refused")
    lp.add_argument("--allow-shared-content", action="store_true",
                    help="records already released under another --source of this --state-dir are different "
                    "people's records (without it such a release is refused)")
    lp.add_argument("--out", help="output directory (default runs/local-<time>)")
    lp.add_argument("--init-adapter", help="start from this saved adapter directory")
    lp.add_argument("settings", nargs="*", help="job settings as key=value (see `fedtune config`)")
    lp.set_defaults(func=cmd_local)

    ep = sub.add_parser("evaluate", help="evaluate a saved adapter on a file or the packaged data (no training)")
    ep.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    ep.add_argument("--data", help="CSV, JSONL or Parquet file (default: packaged BBC News)")
    ep.add_argument("--split", default="test", choices=["train", "val", "test"],
                    help="which split of the data to evaluate on (default test; the same seeded split as training)")
    ep.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ep.add_argument("settings", nargs="*", help="job settings as key=value (must match the adapter's)")
    ep.set_defaults(func=cmd_evaluate)

    gp = sub.add_parser("ledger", help="print this node's privacy ledger")
    gp.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                    help=f"node state directory holding the privacy ledger (default {DEFAULT_STATE_DIR})")
    gp.add_argument("--json", action="store_true", help="machine-readable output")
    gp.set_defaults(func=cmd_ledger)

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

    kp = sub.add_parser("keys", help="make TLS certificates and SuperNode authentication keys",
                        description="init: the operator's CA + SuperLink certificate; node: an organization's "
                        "SuperNode key pair; fingerprint: check a peer's public key out of band.")
    actions = kp.add_subparsers(dest="action", required=True, metavar="ACTION")
    raw = argparse.RawDescriptionHelpFormatter
    ki = actions.add_parser("init", formatter_class=raw, help="operator: the federation's CA and the SuperLink's TLS "
                            "certificate (+ --node key pairs), in --out", description=KEYS_INIT)
    kn = actions.add_parser("node", formatter_class=raw, help="organization: this node's SuperNode key pair, in "
                            "--out/nodes/", description=KEYS_NODE)
    for a in (ki, kn):
        a.add_argument("--out", required=True, help="directory for the files (private keys are written 0600)")
        a.add_argument("--force", action="store_true", help="overwrite existing files")
        a.set_defaults(func=cmd_keys, paths=[])
    ki.add_argument("--host", action="append", help="SuperLink address for its certificate (repeatable; "
                    "default 127.0.0.1 and localhost)")
    ki.add_argument("--node", action="append", help="also make a SuperNode key pair with this name (repeatable)")
    kn.add_argument("--node", action="append", required=True, help="the node's name: writes nodes/NAME.key and "
                    "nodes/NAME.pub (repeatable)")
    kf = actions.add_parser("fingerprint", formatter_class=raw, help="print each public key's fingerprint to "
                            "compare with its owner out of band", description=KEYS_FINGERPRINT)
    kf.add_argument("paths", nargs="*", help=".pub files, approved-peers directories or files")
    kf.set_defaults(func=cmd_keys)
