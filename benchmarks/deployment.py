"""Deployment costs: a ClientApp process's start-up per message, and a round in deployment vs simulation.

    python benchmarks/deployment.py

1. Start-up: in deployment every message runs in a fresh ClientApp process. Each
   variant runs in its own new process: importing the app (Flower, torch,
   transformers, PEFT, Opacus), then preparing the node for a job (model, data,
   tokens, noise calibration) with an empty disk cache and with a warm one.
2. The same 3-node, 2-round job (MiniLM, DP, secure aggregation) in a real
   deployment (TLS SuperLink with node auth, SuperNodes as processes, `flwr run`)
   and in Flower's simulation engine, rounds' wall times side by side.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREPARE = """
import sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import fedtune.client.app
from fedtune.client.runtime import get_node
from fedtune.client.node_config import node_settings
from fedtune.common.training.config import load_config
t1 = time.perf_counter()
cfg = load_config({"data.path": sys.argv[1], "data.labels": "finance,sport", "model.max-length": 64,
                   "train.batch-size": 8, "train.rounds": 4, "train.threads": 1})
ns = node_settings({"state-dir": sys.argv[2], "max-epsilon": 8, "data-path": sys.argv[1]}, 1, cfg, {})
get_node(cfg, ns)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


def startup(tmp: Path) -> dict:
    from fedtune.simulations.synthetic import write_easy_csv

    data = write_easy_csv(tmp / "org.csv", n=400)
    rows = {"cold": [], "warm": []}
    for i in range(3):
        state = tmp / f"state-{i}"
        for kind in ("cold", "warm"):  # same state dir: the second process finds the disk cache
            out = subprocess.run([sys.executable, "-c", PREPARE, str(data), str(state)], capture_output=True,
                                 text=True, cwd=ROOT, check=True)
            imp, prep = map(float, out.stdout.split()[-2:])
            rows[kind].append((imp, prep))
    return {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in rows.items()}


def rounds_side_by_side(tmp: Path) -> tuple[list[float], list[float], float, float]:
    from fedtune.common.operations.rundir import RunDir
    from fedtune.common.training.config import load_config
    from fedtune.simulations.deployment import LocalFederation
    from fedtune.simulations.run import simulate
    from fedtune.simulations.synthetic import write_easy_csv

    job = {"fed.num-nodes": 3, "fed.min-nodes": 3, "train.rounds": 2, "fed.fraction-evaluate": 0.0,
           "data.labels": "finance,sport", "data.max-records": 0, "model.max-length": 16, "train.batch-size": 8,
           "train.local-steps": 2, "train.threads": 1, "fed.round-timeout": 300.0}
    # deployment
    fed = LocalFederation(tmp / "fed")
    t0 = time.perf_counter()
    try:
        orgs = ["org-0", "org-1", "org-2"]
        fed.make_keys(orgs)
        fed.start_superlink()
        for i, o in enumerate(orgs):
            fed.register(o)
            fed.start_supernode(o, {"name": o, "data-path": str(write_easy_csv(tmp / f"{o}.csv", n=60, seed=i)),
                                    "state-dir": str(tmp / "state" / o), "max-epsilon": 8,
                                    "approved-peers": str(fed.approve(o, orgs))})
        held = write_easy_csv(tmp / "held.csv", n=80, seed=9)
        fed.run({**job, "fed.run-dir": str(tmp / "dep-run"), "data.path": str(held)}, timeout=900)
    finally:
        fed.stop()
    dep_total = time.perf_counter() - t0
    dep = [r.seconds for r in RunDir(tmp / "dep-run").rounds()]
    # simulation: the same job on the server's file partitioned into 3 (IID)
    t0 = time.perf_counter()
    pool = write_easy_csv(tmp / "pool.csv", n=260, seed=5)
    cfg = load_config({**job, "data.path": str(pool), "sim.partitioner": "iid", "fed.run-dir": str(tmp / "sim-run")})
    simulate(cfg, out=lambda s: None, report=False)
    sim_total = time.perf_counter() - t0
    sim = [r.seconds for r in RunDir(tmp / "sim-run").rounds()]
    return dep, sim, dep_total, sim_total


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        s = startup(tmp)
        print("ClientApp process start-up per message (median of 3, each in a fresh process):")
        print(f"  import the app (Flower, torch, transformers, PEFT, Opacus): {s['cold'][0]:.2f}s")
        print(f"  prepare the node, empty disk cache (model, read data, tokenize, calibrate noise): {s['cold'][1]:.2f}s")
        print(f"  prepare the node, warm disk cache (model, read data; tokens and noise from disk): {s['warm'][1]:.2f}s")
        print(f"  -> total per message: {s['cold'][0] + s['cold'][1]:.2f}s cold, {s['warm'][0] + s['warm'][1]:.2f}s "
              f"warm")
        dep, sim, dt, st = rounds_side_by_side(tmp)
        print("same 3-node, 2-round job (DP + secure aggregation), seconds per round:")
        print(f"{'round':>7}{'deployment':>12}{'simulation':>12}{'ratio':>8}")
        for i, (a, b) in enumerate(zip(dep, sim), start=1):
            print(f"{i:>7}{a:>12.1f}{b:>12.1f}{a / b:>8.1f}")
        print(f"{'total':>7}{dt:>12.1f}{st:>12.1f}{dt / st:>8.1f}   (incl. start-up of SuperLink/nodes or Ray)")


if __name__ == "__main__":
    main()
