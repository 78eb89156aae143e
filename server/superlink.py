"""``fedtune superlink``: the operator's SuperLink, with only the Fleet API facing the network.

    fedtune superlink --keys fed-keys --database /var/lib/fedtune/superlink.db --port 9092

starts ``flower-superlink`` on 127.0.0.1 (TLS with the federation's certificate, SuperNode
authentication, a database so registrations and runs survive restarts) and the Fleet
gateway (``server/gateway.py``) on the public address, which forwards only SuperNodes'
``/v1/fleet/*`` requests. ``flwr run``, ``flwr ls``, ``flwr supernode register`` and the
rest of the Control API are reachable on the SuperLink host only (or through an SSH
tunnel), because Flower 1.41's open-source distribution has no authentication for them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedtune.common.errors import FedtuneError


def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else (shutil.which(name) or name)


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FedtuneError(f"the SuperLink exited with status {proc.returncode} while starting",
                               "see its log lines above")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FedtuneError(f"nothing listens on {host}:{port} after {timeout:.0f}s", "see the SuperLink's log")


def superlink_command(*, keys: Path, database: Path, control_port: int) -> list[str]:
    return [_exe("flower-superlink"), "--ssl-ca-certfile", str(keys / "ca.crt"),
            "--ssl-certfile", str(keys / "server.crt"), "--ssl-keyfile", str(keys / "server.key"),
            "--enable-supernode-auth", "--database", str(database), "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(control_port), "--disable-runtime-dependency-installation"]


def _covers_loopback(cert_file: Path) -> bool:
    import ipaddress

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)


def check(keys: Path, database: Path, host: str, port: int, control_port: int) -> None:
    problems = [f"{keys / f} is missing (make it with `fedtune keys init --out {keys} --host <this host>`)"
                for f in ("ca.crt", "server.crt", "server.key") if not (keys / f).is_file()]
    if (keys / "server.key").is_file() and (keys / "server.key").stat().st_mode & 0o077:
        problems.append(f"{keys / 'server.key'} is readable by other users; run `chmod 600 {keys / 'server.key'}`")
    if (keys / "server.crt").is_file() and not _covers_loopback(keys / "server.crt"):
        problems.append(f"{keys / 'server.crt'} is not valid for 127.0.0.1, where the gateway reaches the SuperLink; "
                        f"remake it with `fedtune keys init --out {keys} --host <this host> --force`")
    if not database.parent.is_dir():
        problems.append(f"--database {database}: its directory {database.parent} does not exist")
    if port == control_port:
        problems.append("--port and --control-port must differ")
    for h, p, what in ((host, port, "--port"), ("127.0.0.1", control_port, "--control-port")):
        if not _free(h, p):
            problems.append(f"{what}: {h}:{p} is already in use")
    if problems:
        raise FedtuneError("cannot start the SuperLink: " + "; ".join(problems), "fix the items above and retry")


def run(*, keys: str, database: str, host: str, port: int, control_port: int, log_file: str | None = None) -> int:
    """Run the SuperLink (loopback) and the Fleet gateway (``host:port``) until interrupted."""
    import uvicorn
    from fedtune.server.gateway import create_app

    keys_p, db = Path(keys).expanduser(), Path(database).expanduser()
    check(keys_p, db, host, port, control_port)
    # Flower's helpers (flower-superexec, flwr-serverapp) are started by name: those of this installation
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - lives as long as the child
    link = subprocess.Popen(superlink_command(keys=keys_p, database=db, control_port=control_port), env=env,
                            stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
    try:
        wait_port("127.0.0.1", control_port, 60, link)
        print(f"fedtune superlink: SuperLink on 127.0.0.1:{control_port} (Control API: this host only); Fleet "
              f"gateway for SuperNodes on {host}:{port} (TLS, /v1/fleet/* only)", flush=True)
        print(f"  operator's flwr CLI (FLWR_HOME/config.toml): address = \"127.0.0.1:{control_port}\", "
              f"root-certificates = \"{keys_p.resolve() / 'ca.crt'}\"", flush=True)
        print(f"  SuperNodes: --superlink <this host>:{port}; Ctrl-C stops both", flush=True)
        app = create_app(f"https://127.0.0.1:{control_port}", ca_file=str(keys_p / "ca.crt"))
        # uvicorn re-raises SIGTERM after its graceful shutdown: make that an exit that runs the cleanup below
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        uvicorn.run(app, host=host, port=port, ssl_certfile=str(keys_p / "server.crt"),
                    ssl_keyfile=str(keys_p / "server.key"), log_level="warning")
        return 0
    finally:
        if link.poll() is None:
            os.killpg(link.pid, signal.SIGTERM)
            try:
                link.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(link.pid, signal.SIGKILL)
        if out:
            out.close()
