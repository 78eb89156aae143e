"""Run a federated job with Flower's simulation engine, in this process, and write its report.

    fedtune simulate simulations/scenarios/demo.toml fed.num-nodes=10 privacy.target-epsilon=4

Virtual nodes run as Ray workers on this machine (a private Ray temp dir, a
private local cluster, shut down at the end), each with its partition of the
data; the server writes the run directory and this driver adds ``report.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.common.training.config import JobConfig

log = logging.getLogger(__name__)
SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def read_scenario(path: str | Path) -> dict[str, Any]:
    """Flat settings from a scenario TOML file (tables become dotted keys)."""
    p = Path(path)
    if not p.is_file() and (SCENARIOS / f"{path}.toml").is_file():
        p = SCENARIOS / f"{path}.toml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in SCENARIOS.glob("*.toml")))
        raise FedtuneError(f"scenario {path} not found", f"give a TOML file path or one of: {known}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: not valid TOML ({e})"]) from None
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v

    walk("", raw)
    return flat


@contextlib.contextmanager
def _private_runtime(run_dir: Path, *, ray_address: str = "", node_cache: Path | None = None):
    """Ray and Flower confined to private temp dirs, no telemetry; restored afterwards.

    With ``ray_address`` the simulation joins that Ray cluster instead of starting a private one.
    ``node_cache``: where the virtual nodes keep their tokens and features (default: in the private temp dir,
    deleted with it; ``fedtune tune`` gives its study's node state directory, so trials reuse them).
    """
    from fedtune.client.runtime import SIM_CACHE_ENV

    tmp = Path(tempfile.mkdtemp(prefix="fedtune-ray-"))
    env = {"RAY_ADDRESS": ray_address or "local", "RAY_TMPDIR": str(tmp), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_HOME": str(tmp / "flwr"), "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false",
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
           # the virtual nodes' tokens and features, shared by this simulation's workers, deleted with it
           SIM_CACHE_ENV: str(node_cache or os.environ.get(SIM_CACHE_ENV) or tmp / "node-cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield tmp
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


@contextlib.contextmanager
def _without_run_simulation_deprecation():
    """Silence Flower's one deprecation notice for ``run_simulation`` (printed twice, in full, before our output).

    We call ``run_simulation`` on purpose: ``flwr run``'s local simulation starts a detached
    SuperLink that keeps running after the job, and it reports a ServerApp's exception only in
    its logs; ``run_simulation`` runs in this process, raises nothing silently (errors reach our
    result check below) and leaves no process behind. Every other Flower warning still shows.
    """
    flwr_log = logging.getLogger("flwr")
    drop = _DropRunSimulationDeprecation()
    flwr_log.addFilter(drop)
    try:
        yield
    finally:
        flwr_log.removeFilter(drop)


def concurrent_nodes(cfg: JobConfig, cores: int) -> int:
    """How many virtual nodes a private local Ray runs at once (``sim.concurrent-nodes``; 0 = auto).

    Auto runs every node at once when memory allows: partitions differ in size, and with one node per core
    the last, largest node trained alone while the other core idled (measured on the demo: one of two cores
    idle for about 17 s of each 46 s round). With more nodes than cores the OS shares the cores and none idles
    until the work is done. Each running node holds its own copy of the model, so auto stops at what half of
    this machine's memory holds (about 1 GB per process plus 4x the model's fp32 weights, an estimate).
    A head-only recipe with cached features is the exception: a node's round is then a few milliseconds of
    head training, and each worker's cost is loading the model, so auto runs one node per core.
    """
    per = max(1, cfg.sim.cpus_per_node)
    if cfg.sim.concurrent_nodes:
        return cfg.sim.concurrent_nodes
    if cfg.lora.head_only and cfg.train.cache_features and cfg.model.task == "seq-cls":
        return max(1, cores // per)
    fit = max(1, int(_memory_bytes() * MEMORY_SHARE // _node_bytes(cfg)))
    return max(cores // per, 1, min(cfg.fed.num_nodes, fit))


# How many virtual nodes fit in memory at once (sim.concurrent-nodes=0): a node is its Python process with torch
# (NODE_BASE_BYTES) plus NODE_WEIGHT_FACTOR x the model's fp32 weight bytes (weights, activations, per-sample
# gradients); the nodes may use MEMORY_SHARE of the machine's memory (FALLBACK_MEMORY where it cannot be read).
NODE_BASE_BYTES = 1 << 30
NODE_WEIGHT_FACTOR = 4
MEMORY_SHARE = 0.5
FALLBACK_MEMORY = 8 << 30


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        return FALLBACK_MEMORY


def _node_bytes(cfg: JobConfig) -> int:
    """A running virtual node's memory, estimated: the Python process, torch and the model (weights in fp32, and
    room for activations and the per-sample gradients)."""
    from fedtune.common.training.model import resolve_model_path

    directory = resolve_model_path(cfg.model.path)
    weights = sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".safetensors", ".bin"))
    return NODE_BASE_BYTES + NODE_WEIGHT_FACTOR * weights


def run_dir_of(cfg: JobConfig) -> Path:
    """Where a simulation of ``cfg`` writes: ``fed.run-dir``, or ``runs/sim-<time>``."""
    return Path(cfg.fed.run_dir or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")).resolve()


def simulate(cfg: JobConfig, *, out: Callable[[str], None] = print, report: bool = True,
             node_state: str | Path | None = None) -> dict:
    """Run ``cfg`` as a Flower simulation; returns {"summary", "run_dir", "seconds"}.

    ``node_state``: where the simulated nodes keep their state (ledgers); default the run directory's
    ``nodes/``. ``fedtune tune`` gives every trial the same one, so each node's ledger holds the whole search.
    """
    from fedtune.client.app import make_client_app
    from fedtune.server.app import make_server_app
    from flwr.simulation import run_simulation

    run_dir = run_dir_of(cfg)
    # the job as it runs, built once from valid values (no re-parsing): the server and every virtual node get it
    train = dataclasses.replace(
        cfg.train, threads=cfg.train.threads or cfg.sim.cpus_per_node,
        # nodes were given no GPU: all of it on the CPU
        device="cpu" if not cfg.sim.gpus_per_node and cfg.train.device == "auto" else cfg.train.device)
    cfg = dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, run_dir=str(run_dir)), train=train)
    from fedtune.common.training.federated_data import partition_sizes

    sizes = partition_sizes(cfg, cfg.fed.num_nodes)  # fail early, with a clear message, on impossible splits
    if cfg.fed.tracking:  # likewise a missing tracking library or an MLflow store that does not open
        from fedtune.common.operations.tracking import check

        check(cfg.to_flat(), run_dir)
    out(f"fedtune simulate: {cfg.fed.num_nodes} virtual nodes ({cfg.sim.partitioner} partitions of "
        f"{min(sizes)}-{max(sizes)} records), {cfg.train.rounds} rounds, "
        f"{'DP-SGD at epsilon ' + format(cfg.privacy.target_epsilon, 'g') if cfg.privacy.enabled else 'NO DP'}, "
        f"{cfg.lora.describe()}; run directory {run_dir}")
    if not cfg.privacy.enabled:
        from fedtune.common.privacy.accounting import DP_OFF_WARNING

        out(f"WARNING: {DP_OFF_WARNING}")
    result: dict = {}
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    env_address = os.environ.get("RAY_ADDRESS", "")
    address = cfg.sim.ray_address or (env_address if env_address != "local" else "")
    gpus = cfg.sim.gpus_per_node
    if address:
        init_args = {"address": address}  # an existing cluster: its resources are what they are
        out(f"joining the Ray cluster at {address}")
    else:
        slots = concurrent_nodes(cfg, cores)
        # Ray's CPUs are logical: one slot per node that may run at once, each node with sim.cpus-per-node threads
        init_args = {"num_cpus": slots * cfg.sim.cpus_per_node, "include_dashboard": False}
        out(f"local Ray: {min(slots, cfg.fed.num_nodes)} of {cfg.fed.num_nodes} nodes run at once, "
            f"{cfg.sim.cpus_per_node} thread(s) each, on {cores} cores")
        if gpus:
            import torch

            if not torch.cuda.is_available():
                raise FedtuneError(f"sim.gpus-per-node={gpus:g} but torch sees no CUDA GPU on this machine",
                                   "set sim.gpus-per-node=0 (nodes train on the CPU), or run on a GPU machine")
            init_args["num_gpus"] = torch.cuda.device_count()
    cache = Path(node_state) / "cache" if node_state else None  # a study's node state (tune), never a run directory
    with _private_runtime(run_dir, ray_address=address, node_cache=cache), _without_run_simulation_deprecation():
        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_simulation(server_app=make_server_app(cfg, result=result, out=out, simulated=True),
                       client_app=make_client_app(cfg, sim_state_root=Path(node_state or run_dir / "nodes")),
                       num_supernodes=cfg.fed.num_nodes,
                       backend_config={"client_resources": {"num_cpus": cfg.sim.cpus_per_node, "num_gpus": gpus},
                                       "init_args": init_args})
    if "summary" not in result:
        raise FedtuneError(f"the simulation ended without a result; see the log above and {run_dir}",
                           "fix the error reported above and run again")
    result["seconds"] = time.perf_counter() - t0
    if report:
        from fedtune.simulations.report import write_report

        path = write_report(run_dir)
        out(f"report: {path}")
    return result

