"""``fedtune node``: start an organization's SuperNode the way fedtune's guarantees need it.

One command instead of a hand-assembled ``flower-supernode`` line:

    fedtune node --superlink fl.example.org:9092 --ca ca.crt --key my-keys/nodes/hospital-a.key \\
        --config node.toml

It checks the node's own configuration first (one message per problem, before anything
starts), then runs ``flower-supernode`` with TLS (the federation's CA), SuperNode
authentication (the organization's key), the node config, and the app guard
(``client/guard.py``) first on its PATH as ``flwr-clientapp``: every message is handled
by the fedtune ClientApp installed here, and a run of any other app is refused before
any of its code runs. The SuperNode's own ClientApp port stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from fedtune.client.node_config import KEYS, node_settings
from fedtune.common.errors import ConfigError, FedtuneError


def read_node_config(path: str | Path) -> dict:
    """The node config from a TOML file of ``key = value`` lines (the keys of docs/deployment.md)."""
    p = Path(path).expanduser()
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtuneError(f"node config {p} does not exist", "write it (see docs/deployment.md, section 3)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"{p}: not a readable TOML file ({e})"]) from None
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError([f"{p}: tables are not node config keys: {', '.join(nested)} (known: {', '.join(KEYS)})"])
    return raw


def flower_node_config(values: dict) -> str:
    """The ``--node-config`` string Flower parses (``key="text"`` or ``key=number``)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            v = "on" if v else "off"
        if isinstance(v, str):
            if '"' in v or "\n" in v:
                raise ConfigError([f"node config {k!r}: a value may not contain double quotes or new lines"])
            parts.append(f'{k}="{v}"')
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            raise ConfigError([f"node config {k!r}: expected a string or a number, got {type(v).__name__}"])
    return " ".join(parts)


def guard_bin(state_dir: Path) -> Path:
    """A directory holding ``flwr-clientapp``: the app guard of this installation (put first on the PATH)."""
    d = Path(state_dir) / "bin"
    d.mkdir(parents=True, exist_ok=True)
    shim = d / "flwr-clientapp"
    run = "import sys; from fedtune.client.guard import main; sys.exit(main())"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{run}' \"$@\"\n", encoding="utf-8")
    shim.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return d


def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else (shutil.which(name) or name)


def prepare(*, superlink: str, ca: str, key: str, config: dict, port: int, retries: int | None = None,
            max_wait: float | None = None) -> tuple[list[str], dict]:
    """Check everything and return (the flower-supernode command, its environment)."""
    problems = []
    ca_p, key_p = Path(ca).expanduser(), Path(key).expanduser()
    if not ca_p.is_file():
        problems.append(f"--ca {ca_p}: no such file (the federation's CA certificate from the operator)")
    if not key_p.is_file():
        problems.append(f"--key {key_p}: no such file (this node's private key, `fedtune keys node`)")
    elif key_p.stat().st_mode & 0o077:
        problems.append(f"--key {key_p}: readable by other users; run `chmod 600 {key_p}`")
    if ":" not in superlink:
        problems.append(f"--superlink {superlink!r}: expected HOST:PORT")
    config = dict(config)
    if ("approved-peers" in config or "roster" in config) and "identity-key" not in config:
        config["identity-key"] = str(key_p)  # the SuperNode key also signs its secure-aggregation keys
    if problems:
        raise ConfigError(problems)
    ns = node_settings(config, 0)  # the node's own rules, checked once here with every problem listed
    data = Path(ns.data_path).expanduser()
    if not data.is_file():
        raise FedtuneError(f"data-path {data} does not exist or is not a file",
                           "point data-path in the node config at this organization's records")
    ns.state_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=os.pathsep.join([str(guard_bin(ns.state_dir)), str(Path(sys.executable).parent),
                                                 os.environ.get("PATH", "")]),
               FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [_exe("flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca_p),
           "--auth-supernode-private-key", str(key_p), "--node-config", flower_node_config(config),
           "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)]
    if retries is not None:
        cmd += ["--max-retries", str(retries)]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd, env


def run(**kw) -> int:
    """Start the SuperNode in the foreground; Ctrl-C (or SIGTERM) stops it."""
    cmd, env = prepare(**kw)
    print(f"fedtune node: SuperNode for {kw['superlink']} (TLS, node authentication, the installed fedtune app "
          "only); Ctrl-C stops it", flush=True)
    proc = subprocess.Popen(cmd, env=env)

    def stop(signum, _frame) -> None:
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()
