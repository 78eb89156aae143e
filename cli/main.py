"""``fedtune``: the command line, one module per area. User errors become one message and a non-zero exit.

    organization (cli/node.py)     local, evaluate, ledger, node, keys
    researcher (cli/simulate.py)   simulate, demo, baselines, tune
    operator (cli/operate.py)      superlink, status, dashboard, config
    serving (cli/serve.py)         export, registry add|list|show|compare|promote|rollback|verify, predict, drift

Each area module has ``add_parsers(sub)`` and one ``cmd_*`` function per command; the recipes
behind them live in the library (``fedtune.common.training.local``, ``fedtune.simulations``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fedtune.cli import node, operate, serve, simulate
from fedtune.common.errors import FedtuneError

AREAS = (node, simulate, operate, serve)


EXIT_CODES = """exit status:
  0    success
  1    user error: a missing or bad file, setting or value (one message: the
       problem and the fix)
  2    usage error: an unknown command or option, a missing or malformed
       argument (argparse's message and the command's usage)
  3    a node's privacy budget would be exceeded
  4    fedtune drift found drift
  130  interrupted (Ctrl-C)"""


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedtune")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated, differentially private fine-tuning of a "
                                "pretrained model (a DP linear probe by default, LoRA adapters on request).",
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fedtune {installed_version()}",
                   help="print the installed fedtune version and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)
    for area in AREAS:
        area.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # fedtune never downloads: models and data load from local paths (air-gapped nodes). Every from_pretrained
    # passes local_files_only=True; this also keeps libraries it starts (datasets, Ray workers) off the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return code
    except FedtuneError as e:
        print(f"fedtune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedtune registry list | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
