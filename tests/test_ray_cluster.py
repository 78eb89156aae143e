"""sim.ray-address: a simulation joins an existing Ray cluster (started here with `ray start --head`) instead of
a private one; sim.gpus-per-node without a GPU is one clear error."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from fedtune.common.errors import FedtuneError
from fedtune.common.training.config import load_config
from fedtune.simulations.run import read_scenario, simulate
from helpers import LORA_RECIPE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str) -> None:
    """Stop only the Ray processes of this head (never `ray stop`, which stops every Ray on the machine)."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        for c in [p, *p.children(recursive=True)]:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.slow
def test_a_simulation_runs_on_an_existing_ray_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit AF_UNIX limits
    port = _free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    try:
        subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", "2", "--temp-dir", temp_dir,
                        "--include-dashboard", "false", "--disable-usage-stats"], check=True, capture_output=True,
                       timeout=120)
        lines: list[str] = []
        cfg = load_config({**read_scenario("tiny"), "train.rounds": 1, "fed.run-dir": str(tmp_path / "run"),
                           "sim.ray-address": f"127.0.0.1:{port}"})
        result = simulate(cfg, out=lines.append, report=False)
        assert f"joining the Ray cluster at 127.0.0.1:{port}" in lines
        assert result["summary"]["rounds_completed"] == 1
        rounds = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
        assert rounds[0]["status"] == "ok" and rounds[0]["nodes_replied"] == 3
        # the virtual nodes ran as actors of that cluster: their logs are in its session directory
        time.sleep(1)
        logs = list(Path(temp_dir).glob("session_latest/logs/worker-*.out"))
        assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs)
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_gpus_per_node_without_a_gpu_is_one_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():  # the check is about machines without one; on a GPU machine it must pass
        assert load_config({"sim.gpus-per-node": 0.5}).sim.gpus_per_node == 0.5
        return
    cfg = load_config({**read_scenario("tiny"), "fed.run-dir": str(tmp_path / "run"), "sim.gpus-per-node": 0.5})
    with pytest.raises(FedtuneError, match="sim.gpus-per-node=0.5 but torch sees no CUDA GPU"):
        simulate(cfg, out=lambda s: None, report=False)
    assert not (tmp_path / "run" / "rounds.jsonl").exists()


def test_every_node_runs_at_once_while_memory_allows(monkeypatch):
    from fedtune.common.errors import ConfigError
    from fedtune.simulations import run

    cfg = load_config({**LORA_RECIPE, "fed.num-nodes": 5})
    # a LoRA job of the demo's shape on 2 cores: all 5 nodes at once (2 would leave one core idle behind the largest node)
    monkeypatch.setattr(run, "_memory_bytes", lambda: 24 << 30)
    assert run.concurrent_nodes(cfg, cores=2) == 5
    # memory bounds it: each running node holds the model; never fewer than one node per core
    monkeypatch.setattr(run, "_memory_bytes", lambda: 3 * run._node_bytes(cfg))
    assert run.concurrent_nodes(cfg, cores=1) == 1 and run.concurrent_nodes(cfg, cores=2) == 2
    assert run.concurrent_nodes(cfg.replace(**{"sim.cpus-per-node": 2}), cores=8) == 4
    # a head-only recipe on cached features: a round is milliseconds per node, a worker's cost is loading the model
    monkeypatch.setattr(run, "_memory_bytes", lambda: 24 << 30)
    head = cfg.replace(**{"lora.head-only": True})
    assert run.concurrent_nodes(head, cores=2) == 2
    assert run.concurrent_nodes(head.replace(**{"train.cache-features": False}), cores=2) == 5
    # an explicit value is what the researcher asked for
    assert run.concurrent_nodes(cfg.replace(**{"sim.concurrent-nodes": 1}), cores=2) == 1
    with pytest.raises(ConfigError, match="sim.concurrent-nodes"):
        load_config({"sim.concurrent-nodes": -1})
