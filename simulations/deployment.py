"""A real deployment on this machine: one TLS SuperLink with node authentication and SuperNodes as
separate processes, each organization with its own data and state directory (loopback only).

Used by the integration test and the deployment benchmark; the guide in docs/deployment.md
gives the same steps as commands. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.common.operations import keys as pki

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


@dataclass
class LocalFederation:
    """Start/stop a SuperLink and SuperNodes under ``base`` (keys, logs, FLWR_HOME, node state)."""

    base: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0

    def __post_init__(self) -> None:
        self.base = Path(self.base)
        self.keys = self.base / "keys"
        self.logs = self.base / "logs"
        self.home = self.base / "flwr-home"
        self.logs.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict:
        # Flower's executables (and the SuperExec processes the SuperLink starts by name) are the ones
        # installed next to this Python, also when its environment was not activated.
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        env = dict(os.environ, PATH=path, FLWR_HOME=str(self.home), FLWR_TELEMETRY_ENABLED="0",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.base,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def make_keys(self, nodes: list[str]) -> None:
        pki.make_ca(self.keys)
        pki.make_server_cert(self.keys, hosts=["127.0.0.1", "localhost"])
        for n in nodes:
            pki.make_node_keys(self.keys / "nodes", n)

    def start_superlink(self, timeout: float = 60) -> None:
        """``fedtune superlink``: the SuperLink on loopback (Control API) and the Fleet gateway on ``port``.

        Started again after a crash with the same ports and database."""
        if not self.port:
            self.port, self.control_port = free_port(), free_port()
        self.start("superlink", [sys.executable, "-m", "fedtune.cli", "superlink", "--keys", str(self.keys),
                                 "--database", str(self.base / "superlink.db"), "--host", "127.0.0.1",
                                 "--port", str(self.port), "--control-port", str(self.control_port),
                                 "--log", str(self.logs / "flower-superlink.log")])
        wait_port(self.control_port, timeout)
        wait_port(self.port, timeout)
        self.home.mkdir(parents=True, exist_ok=True)
        ca = self.keys / "ca.crt"
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local-tls"\n\n'
            f'[superlink.local-tls]\naddress = "127.0.0.1:{self.control_port}"\nroot-certificates = "{ca}"\n\n'
            f'[superlink.outside]\naddress = "127.0.0.1:{self.port}"\nroot-certificates = "{ca}"\n')

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_exe("flwr"), *args], capture_output=True, text=True, env=self.env(), cwd=self.base,
                              timeout=timeout)

    def register(self, name: str) -> None:
        r = self.flwr("supernode", "register", str(self.keys / "nodes" / f"{name}.pub"), "local-tls",
                      "--format", "json")
        if r.returncode != 0:
            raise RuntimeError(f"registering {name} failed: {r.stdout} {r.stderr}")

    def approve(self, org: str, peers: list[str]) -> Path:
        """``org``'s approved-peers directory: its peers' public keys (in a real federation each organization
        collects them itself and checks their fingerprints out of band; here they are copied)."""
        d = self.base / "approved" / org
        d.mkdir(parents=True, exist_ok=True)
        for peer in peers:
            if peer != org:
                (d / f"{peer}.pub").write_bytes((self.keys / "nodes" / f"{peer}.pub").read_bytes())
        return d

    def start_supernode(self, name: str, node_config: dict) -> subprocess.Popen:
        """``fedtune node`` for organization ``name`` with ``node_config`` (written as its TOML file)."""
        conf = self.base / f"{name}.toml"
        conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in node_config.items()), encoding="utf-8")
        return self.start(name, [sys.executable, "-m", "fedtune.cli", "node", "--superlink", f"127.0.0.1:{self.port}",
                                 "--ca", str(self.keys / "ca.crt"), "--key", str(self.keys / "nodes" / f"{name}.key"),
                                 "--config", str(conf), "--port", str(free_port()), "--max-retries", "60",
                                 "--max-wait-time", "300"])

    def run(self, run_config: dict, *, timeout: float, while_waiting=None) -> dict:
        """``flwr run`` this project against the SuperLink; wait for the run to end; its ``flwr ls`` entry."""
        conf = " ".join(f'{k}="{v}"' if isinstance(v, str) else
                        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in run_config.items())
        r = self.flwr("run", str(ROOT), "local-tls", "--run-config", conf, "--format", "json")
        if r.returncode != 0:
            raise RuntimeError(f"flwr run failed: {r.stdout} {r.stderr}")
        out = json.loads(r.stdout)
        if "run-id" not in out:
            raise RuntimeError(f"flwr run did not start a run: {out}")
        run_id = out["run-id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if while_waiting is not None:
                while_waiting()
            ls = self.flwr("ls", "local-tls", "--run-id", str(run_id), "--format", "json")
            if ls.returncode == 0:
                info = json.loads(ls.stdout)["runs"][0]
                if info["status"].startswith("finished"):
                    return info
            time.sleep(2)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f}s")

    def _descendants(self, p: subprocess.Popen) -> list:
        import psutil

        try:
            return psutil.Process(p.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> None:
        """Stop every process started here, and their children (SuperExec, ClientApp processes), by PID."""
        import psutil

        children = [c for p in self.procs.values() for c in self._descendants(p)]
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for c in children:  # SuperExec children live outside their parent's process group
            try:
                c.terminate()
            except psutil.Error:
                pass
        psutil.wait_procs(children, timeout=10)

    def kill(self, name: str) -> None:
        """Kill a process and its children abruptly, as a crash or power cut would."""
        children = self._descendants(self.procs[name])
        try:
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for c in children:
            try:
                c.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


def _exe(name: str) -> str:
    """A Flower executable: the one installed beside this Python, else whatever PATH finds."""
    local = BIN / name
    return str(local) if local.is_file() else (shutil.which(name) or name)
