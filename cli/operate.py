"""Commands an operator or administrator runs: the SuperLink, run status, the dashboard, the settings list."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtune.common.errors import FedtuneError


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


def _read_token(path: str) -> str:
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise FedtuneError(f"cannot read --token-file {path} ({e.__class__.__name__})",
                           "write a long random token into it, e.g. `openssl rand -hex 32 > token`") from None
    if len(token) < 16:
        raise FedtuneError(f"the token in {path} is too short ({len(token)} characters)",
                           "use at least 16 random characters, e.g. `openssl rand -hex 32 > token`")
    return token


def cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn
    from fedtune.server.dashboard import create_app

    root = Path(args.root)
    if not root.is_dir():
        raise FedtuneError(f"{root} is not a directory", "give a run directory or the directory holding runs")
    token = _read_token(args.token_file) if args.token_file else None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise FedtuneError("--tls-cert and --tls-key go together", "give both (e.g. fed-keys/server.crt and .key)")
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not (args.tls_cert and token):
        if not args.insecure:
            raise FedtuneError(
                f"refusing to serve the dashboard on {args.host} without TLS and a token: anyone who can reach it "
                "would read every run's figures", "give --tls-cert/--tls-key (e.g. from `fedtune keys`) and "
                "--token-file, keep the default --host 127.0.0.1, or pass --insecure knowingly")
        missing = " and ".join(x for x, have in (("TLS", args.tls_cert), ("a token", token)) if not have)
        print(f"WARNING: --insecure: the dashboard on {args.host} is served without {missing}: anyone who can "
              "reach it sees every run's figures", file=sys.stderr, flush=True)
    scheme = "https" if args.tls_cert else "http"
    print(f"fedtune dashboard on {scheme}://{args.host}:{args.port}/ over {root.resolve()} (read-only"
          f"{', token required' if token else ''}; Ctrl-C stops)", flush=True)
    wildcard = args.host in ("0.0.0.0", "::", "")
    allowed = ([] if wildcard else [args.host]) + list(args.allowed_host or [])
    if wildcard and not args.allowed_host:
        print(f"note: on {args.host} the dashboard answers only requests for a loopback name; add --allowed-host NAME "
              "for each name users type (this machine's DNS name or address)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(root, token=token, allowed_hosts=allowed), host=args.host, port=args.port,
                log_level="warning",
                ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedtune.common.training.config import describe

    for key, typ, default, help_ in describe():
        print(f"{key:<28} {typ:<6} {default!s:<10} {help_}")
    return 0


def add_parsers(sub) -> None:
    lp = sub.add_parser("superlink", help="the operator: start the SuperLink with its Control API on this host "
                        "only and a Fleet gateway for SuperNodes")
    lp.add_argument("--keys", required=True, help="directory of `fedtune keys init` (ca.crt, server.crt/.key)")
    lp.add_argument("--database", required=True, help="SuperLink state file (registrations and runs persist)")
    lp.add_argument("--host", default="0.0.0.0", help="address SuperNodes reach (default all interfaces)")
    lp.add_argument("--port", type=int, default=9092, help="Fleet gateway port for SuperNodes (default 9092)")
    lp.add_argument("--control-port", type=int, default=9093, help="the SuperLink's own port on 127.0.0.1 "
                    "(Control API for flwr; default 9093)")
    lp.add_argument("--log", help="append the SuperLink's log to this file")
    lp.set_defaults(func=cmd_superlink)

    st = sub.add_parser("status", help="print a run's rounds and nodes (privacy spent vs ceiling) as tables")
    st.add_argument("run_dir", help="a run directory written by the server")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    dp = sub.add_parser("dashboard", help="serve a read-only web dashboard and /metrics over run directories")
    dp.add_argument("root", nargs="?", default="runs", help="a run directory or a directory of runs (default runs)")
    dp.add_argument("--host", default="127.0.0.1", help="address to listen on (default localhost only)")
    dp.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050)")
    dp.add_argument("--tls-cert", help="serve HTTPS with this certificate (needed off this host)")
    dp.add_argument("--tls-key", help="the certificate's private key")
    dp.add_argument("--token-file", help="require this token (file content) on every request (needed off this host)")
    dp.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS and a token")
    dp.add_argument("--allowed-host", action="append", metavar="NAME", help="also answer requests whose Host header "
                    "names NAME (a proxy's or the machine's DNS name; repeatable). Loopback names and --host always "
                    "are; any other Host gets 400 (DNS rebinding)")
    dp.set_defaults(func=cmd_dashboard)

    cp = sub.add_parser("config", help="list every job setting with its type, default and meaning")
    cp.set_defaults(func=cmd_config)
