"""Secure aggregation cost at 10, 50 and 100 nodes, side by side with plaintext and Flower's SecAgg+.

    python benchmarks/secagg.py                       # the demo's adapter update (FFA-LoRA, 38,790 values)
    python benchmarks/secagg.py --nodes 10 --values 75654

Runs the protocol of ``common/secagg.py`` for every node in this one process on the
same random update vectors and reports, per node: upload bytes (masked vector +
encrypted self-mask shares) against the plaintext float32 update, key-epoch bytes,
the protocol's compute time per round (mask + reveal per node, unmask on the
server) against one real local DP training round of a demo node, and message
exchanges per round. Flower's SecAgg+ masking (its quantizer and ``pseudo_rand_gen``)
is timed on the same vectors with the same neighbour count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import secagg as sa


def run_protocol(n: int, d: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vals = {i: rng.normal(0, 0.05, d).astype(np.float32) for i in range(n)}
    t0 = time.perf_counter()
    keys = {i: sa.NodeKeys.generate(epoch=1, index=i) for i in range(n)}
    roster = {i: (k.s_pk, k.c_pk) for i, k in keys.items()}
    ep = sa.Epoch.create(1, roster)
    setup_bytes = []
    for i, k in keys.items():
        sealed = k.join(roster, ep.neighbours[i], ep.threshold)
        ep.store_shares(i, sealed)
        setup_bytes.append(64 + sum(len(b) + 4 for b in sealed.values()))
    setup_s = (time.perf_counter() - t0) / n
    parts = list(range(n))
    L = sa.levels(n_nodes=n, max_weight=1000)
    uploads, bsh, mask_t, up_bytes = {}, {}, [], []
    for i in parts:
        t = time.perf_counter()
        uploads[i], bsh[i] = keys[i].mask(1, vals[i], weight=300, participants=parts, clip=1.0, levels_=L)
        mask_t.append(time.perf_counter() - t)
        up_bytes.append(uploads[i].nbytes + sum(len(b) + 4 for b in bsh[i].values()))
    plan = sa.plan_unmask(ep, participants=parts, uploads=uploads, b_shares=bsh)
    reveal_t, revealed = [], {}
    for h, (b, s) in plan.requests.items():
        t = time.perf_counter()
        revealed[h] = keys[h].reveal(1, uploaded=plan.uploaded, dropped=plan.dropped, b_shares=b, s_shares=s)
        reveal_t.append(time.perf_counter() - t)
    t = time.perf_counter()
    total = sa.unmask(ep, 1, plan=plan, uploads=uploads, revealed=revealed)
    server_s = time.perf_counter() - t
    summed, w = sa.split_sum(total)
    err = np.abs(sa.dequantize_sum(summed, clip=1.0, levels_=L) / w - sum(vals.values()) / n).max()
    return {"n": n, "degree": len(ep.neighbours[0]), "threshold": ep.threshold,
            "upload_bytes": statistics.mean(up_bytes), "plain_bytes": 4 * d, "setup_bytes": statistics.mean(setup_bytes),
            "node_s": statistics.mean(mask_t) + statistics.mean(reveal_t), "server_s": server_s,
            "setup_s": setup_s, "max_err": float(err)}


def flower_secaggplus(n: int, d: int, degree: int, seed: int = 0) -> dict:
    """Flower's SecAgg+ masking of the same-size vector with the same neighbour count (per node)."""
    import os

    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    rng = np.random.default_rng(seed)
    x = [rng.normal(0, 0.05, d)]
    t = time.perf_counter()
    q = quantize(x, 1.0, 1 << 22)
    masked = q[0].astype(np.int64)
    mod = 1 << 32
    for _ in range(degree + 1):  # pairwise masks with each neighbour + the self mask
        masked = (masked + pseudo_rand_gen(os.urandom(32), mod, [masked.shape])[0]) % mod
    return {"node_s": time.perf_counter() - t, "upload_bytes": masked.astype(np.int64).nbytes}


def local_round_seconds() -> float:
    """One real DP-SGD local round of a demo node (about 300 records, FFA-LoRA, SGD), in seconds."""
    import tempfile
    import warnings

    from common.config import load_config
    from common.node import NodePolicy, prepare, train_round
    from simulations.federated_data import node_splits
    from simulations.run import read_scenario

    warnings.simplefilter("ignore")
    cfg = load_config({**read_scenario("demo"), "train.threads": 1})
    splits = node_splits(cfg, 1, cfg.fed.num_nodes)
    with tempfile.TemporaryDirectory() as d:
        node = prepare(cfg, NodePolicy(source="bench", max_epsilon=100), state_dir=d, splits=splits)
        t = time.perf_counter()
        train_round(node, job="bench", round=1, federated=False)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--values", type=int, default=38_790, help="update length (demo FFA-LoRA: 38,790)")
    ap.add_argument("--no-training", action="store_true", help="skip timing a real local training round")
    args = ap.parse_args()
    train_s = None if args.no_training else local_round_seconds()
    print(f"secure aggregation, update of {args.values:,} values; plaintext upload {4 * args.values:,} bytes")
    if train_s:
        print(f"one local DP training round of a demo node (1 thread): {train_s:.2f}s")
    hdr = (f"{'nodes':>6}{'k':>4}{'t':>4}{'upload B':>11}{'x plain':>9}{'setup B':>9}{'node ms':>9}"
           f"{'server ms':>10}{'% train':>9}{'max err':>10}{'Flower B':>10}{'Flower ms':>10}")
    print(hdr)
    for n in args.nodes:
        r = run_protocol(n, args.values)
        f = flower_secaggplus(n, args.values, r["degree"])
        pct = f"{100 * (r['node_s'] + r['server_s'] / n) / train_s:.1f}" if train_s else "-"
        print(f"{n:>6}{r['degree']:>4}{r['threshold']:>4}{r['upload_bytes']:>11,.0f}"
              f"{r['upload_bytes'] / r['plain_bytes']:>9.3f}{r['setup_bytes']:>9,.0f}{1000 * r['node_s']:>9.1f}"
              f"{1000 * r['server_s']:>10.0f}{pct:>9}{r['max_err']:>10.1e}{f['upload_bytes']:>10,}"
              f"{1000 * f['node_s']:>10.1f}")
    print("exchanges per round: fedtune 2 (train+upload, unmask) after the first round (4 in the first and after "
          "a dropout's key was revealed); Flower SecAgg+ 4 (setup, share keys, collect masked, unmask)")
    print("'% train': a node's protocol time plus its share of the server's unmasking, relative to its local "
          "training round (goal <= 10% at 10 nodes)")


if __name__ == "__main__":
    main()
