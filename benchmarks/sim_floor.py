"""A simulation's wall time beside its physical floor: one encoder pass over every record the job touches.

    python benchmarks/sim_floor.py                      # fedtune simulate demo, features cached (the default)
    python benchmarks/sim_floor.py --compare            # ... and the same job with train.cache-features=false
    python benchmarks/sim_floor.py tiny train.rounds=3  # another scenario, with overrides

For a recipe whose encoder is frozen (the default DP linear probe) all the information a job uses is one
forward pass of the encoder over its records; everything else is the head's training (tiny), evaluation,
secure aggregation and Flower's messaging. Printed: the floor (that pass, same threads as the machine has),
the simulation's wall time split into start-up (Ray, the server's model and data, its round-0 evaluation),
per round the train exchange (round 1 includes each node loading the model and computing its features),
secure aggregation (key set-up, unmasking), the server's evaluation and the wait for the nodes' noised
answers, and the ratio wall / floor. Run on an otherwise idle machine; quote ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def floor_seconds(cfg) -> tuple[float, int]:
    """One encoder pass (eval, no gradients) over every record the job touches, with all of this machine's cores."""
    import torch
    from fedtune.common.training import builder, data
    from fedtune.common.training.federated_data import global_splits
    from torch.utils.data import DataLoader

    torch.set_num_threads(os.cpu_count() or 1)
    g = global_splits(cfg)
    records = data.Records(g.train.texts + g.val.texts + g.test.texts, g.train.labels + g.val.labels + g.test.labels,
                           "all")
    lora = builder.build_model(cfg, g.labels)
    ds = data.tokenize(records, lora.tokenizer, label_set=g.labels, max_length=cfg.model.max_length)
    lora.model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=cfg.train.eval_batch_size):
            lora.model(input_ids=batch[0], attention_mask=batch[1])
    return time.perf_counter() - t0, len(ds)


def run(cfg, label: str) -> dict:
    from fedtune.common.operations.rundir import RunDir, RunSummary
    from fedtune.simulations.run import simulate

    t0 = time.time()
    res = simulate(cfg, out=lambda s: print(f"  [{label}] {s}", flush=True), report=False)
    wall = time.time() - t0
    rounds = RunDir(res["run_dir"]).rounds()
    final = RunSummary.from_json(res["summary"]).final_test
    return {"wall": wall, "startup": rounds[0].started - t0, "rounds": rounds, "accuracy": final.get("accuracy"),
            "macro_f1": final.get("macro_f1")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default="demo")
    ap.add_argument("settings", nargs="*", help="overrides key=value")
    ap.add_argument("--compare", action="store_true", help="also run with train.cache-features=false")
    args = ap.parse_args()
    from fedtune.common.training.config import load_config, parse_overrides
    from fedtune.simulations.run import read_scenario

    base = {**read_scenario(args.scenario), **parse_overrides(args.settings)}
    work = Path(tempfile.mkdtemp(prefix="fedtune-floor-"))
    floor, n = floor_seconds(load_config(base))
    print(f"floor: one encoder pass over the {n} records the job touches: {floor:.1f} s ({os.cpu_count()} threads)")
    results = {}
    for cache in ([True, False] if args.compare else [True]):
        label = "features cached" if cache else "uncached"
        cfg = load_config({**base, "train.cache-features": cache, "fed.run-dir": str(work / label.replace(" ", "-"))})
        results[label] = run(cfg, label)
    print()
    print(f"{'':34}" + "".join(f"{k:>18}" for k in results))
    print(f"{'wall time, s':34}" + "".join(f"{r['wall']:>18.1f}" for r in results.values()))
    print(f"{'  x floor':34}" + "".join(f"{r['wall'] / floor:>18.1f}" for r in results.values()))
    print(f"{'  start-up (Ray, server, round 0)':34}" + "".join(f"{r['startup']:>18.1f}" for r in results.values()))
    keys = ("key_setup", "train", "secure_aggregation", "server_eval", "federated_eval_wait")
    for i in range(max(len(r["rounds"]) for r in results.values())):
        for k in keys:
            cells = [r["rounds"][i].timing.get(k) if i < len(r["rounds"]) else None
                     for r in results.values()]
            if any(c for c in cells):
                name = f"  round {i + 1} {k.replace('_', ' ')}" + (" (+load, features)" if i == 0 and k == "train"
                                                                     else "")
                print(f"{name:34}" + "".join(f"{c:>18.1f}" if c is not None else f"{'-':>18}" for c in cells))
    print(f"{'test accuracy / macro-F1':34}" + "".join(
        f"{r['accuracy']:>10.3f} / {r['macro_f1']:.3f}" if r["accuracy"] is not None else f"{'-':>18}"
        for r in results.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
