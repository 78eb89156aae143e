"""Secure aggregation cost per round: a fixed cohort (cross-silo) and sampled cohorts, next to plain FedAvg.

    python benchmarks/secagg.py                          # the demo's FFA-LoRA update (38,790 values)
    python benchmarks/secagg.py --fixed 10 50 100 --population 100 --fraction 0.1 --rounds 3

Runs the protocol of ``common/secagg/`` for every node in this one process, with the
messages encoded exactly as on the wire, and reports per round:

- fixed cohort: the key epoch is set up once and reused (2 exchanges per round after it);
- sampled cohorts: every round samples ``fraction`` of ``population`` nodes and sets up a
  key epoch among them (4 exchanges per round);

with bytes sent and received per node and by the server, protocol CPU time per node and on
the server, and the same figures for plain FedAvg (a float32 update up, a weighted mean on
the server). A real local DP training round of a demo node is timed for scale, and the
aggregate is checked against the plain weighted mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtune.common.secagg import codec  # noqa: E402
from fedtune.common.secagg import protocol as sa  # noqa: E402
from fedtune.common.training.aggregate import fedavg  # noqa: E402

RULES = sa.NodeRules()


def wire_bytes(obj) -> int:
    """Bytes of a message as Flower carries it: arrays, bytes and strings (keys included), numbers as 8."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, str):
        return len(obj.encode())
    if isinstance(obj, dict):
        return sum(wire_bytes(k) + wire_bytes(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(wire_bytes(v) for v in obj)
    return 8


class Meter:
    def __init__(self) -> None:
        self.node_bytes: dict[int, int] = {}
        self.node_s: dict[int, float] = {}
        self.server_s = 0.0
        self.exchanges = 0

    def node(self, nid: int, sent, received, seconds: float) -> None:
        self.node_bytes[nid] = self.node_bytes.get(nid, 0) + wire_bytes(sent) + wire_bytes(received)
        self.node_s[nid] = self.node_s.get(nid, 0.0) + seconds


def setup(ids: list[int], epoch: int, meter: Meter) -> tuple[dict[int, sa.NodeKeys], sa.Epoch]:
    n = len(ids)
    degree = sa.default_degree(n)
    p = sa.Params(job="bench", epoch=epoch, cohort=tuple(ids), seed=0, degree=degree,
                  threshold=sa.threshold(sa.effective_degree(n, degree), 0.5), clip=1.0, max_weight=1000)
    keys, adverts = {}, {}
    for i in ids:
        t = time.perf_counter()
        keys[i], adverts[i] = sa.NodeKeys.generate(p, node=i, name=f"org-{i}", rules=RULES)
        meter.node(i, codec.params_to_wire(p), codec.advert_to_wire(adverts[i]), time.perf_counter() - t)
    t = time.perf_counter()
    p = dataclasses.replace(p, seed=sa.graph_seed("bench", epoch, adverts))
    ep = sa.Epoch(params=p, adverts=adverts)
    join = {**codec.params_to_wire(p), **codec.adverts_to_wire(adverts)}
    meter.server_s += time.perf_counter() - t
    for i in ids:
        t = time.perf_counter()
        sealed = keys[i].join(p, adverts, roster=None)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        ep.store_shares(i, sealed)
        meter.server_s += time.perf_counter() - t
        meter.node(i, join, codec.map_to_wire("shares", sealed), dt)
    meter.exchanges += 2
    return keys, ep


def secure_round(keys, ep: sa.Epoch, rnd: int, vals, weights, meter: Meter) -> np.ndarray:
    p = dataclasses.replace(ep.params, round=rnd)
    ups = {}
    for i in p.cohort:
        t = time.perf_counter()
        out = keys[i].mask(p, vals[i], weight=weights[i], rules=RULES)
        dt = time.perf_counter() - t
        ups[i] = sa.Upload(masked=out["masked"], shares=out["shares"], commit=out["commit"], sig=out["sig"])
        meter.node(i, codec.params_to_wire(p),
                   {"masked": out["masked"], **codec.upload_to_wire(out["shares"], out["commit"], out["sig"])}, dt)
    t = time.perf_counter()
    up = sorted(ups)
    sigs = {u: ups[u].sig for u in up}
    reqs = {h: {"uploaded": up, "signatures": sigs, "survivor_signatures": {},
                "b_shares": {o: ups[o].shares[h] for o in up if h in ups[o].shares}, "s_shares": {}} for h in up}
    meter.server_s += time.perf_counter() - t
    revealed = {}
    for h, req in reqs.items():
        t = time.perf_counter()
        revealed[h] = keys[h].reveal(rnd, rules=RULES, **req)
        dt = time.perf_counter() - t
        wire = codec.unmask_request(codec.UnmaskRequest(params=p, uploaded=up, sigs=sigs, survivor_sigs={},
                                                        b_shares=req["b_shares"], s_shares={}))
        meter.node(h, wire, codec.reveal_to_wire(*revealed[h]), dt)
    t = time.perf_counter()
    total = sa.unmask(ep, p, uploads=ups, revealed=revealed)
    summed, w = sa.split_sum(total)
    mean = sa.dequantize_sum(summed, clip=p.clip, levels_=p.levels) / w
    meter.server_s += time.perf_counter() - t
    meter.exchanges += 2
    return mean


def plain_round(ids, vals, weights) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    g = {"u": np.zeros_like(vals[ids[0]])}
    mean = fedavg(g, [{"u": vals[i]} for i in ids], [float(weights[i]) for i in ids])["u"]
    return mean, time.perf_counter() - t


def run(mode: str, *, population: int, cohort: int, d: int, rounds: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vals = {i: rng.normal(0, 0.05, d).astype(np.float32) for i in range(population)}
    weights = {i: int(rng.integers(50, 500)) for i in range(population)}
    meter, plain_s, err = Meter(), 0.0, 0.0
    keys = ep = None
    sampler = random.Random(seed)
    for rnd in range(1, rounds + 1):
        ids = sorted(sampler.sample(range(population), cohort)) if mode == "sampled" else list(range(cohort))
        if ep is None or list(ep.params.cohort) != ids:
            keys, ep = setup(ids, rnd, meter)
        mean = secure_round(keys, ep, rnd, vals, weights, meter)
        want, s = plain_round(ids, vals, weights)
        plain_s += s
        err = max(err, float(np.abs(mean - want).max()))
    taken = rounds * cohort  # node participations
    return {"mode": mode, "population": population, "cohort": cohort,
            "degree": sa.effective_degree(cohort, ep.params.degree), "t": ep.params.threshold,
            "exchanges": meter.exchanges / rounds, "node_bytes": sum(meter.node_bytes.values()) / taken,
            "node_ms": 1000 * sum(meter.node_s.values()) / taken,
            "server_bytes": sum(meter.node_bytes.values()) / rounds, "server_ms": 1000 * meter.server_s / rounds,
            "plain_node_bytes": 4 * d + 8, "plain_server_ms": 1000 * plain_s / rounds, "max_err": err}


def local_round_seconds() -> float:
    """One real DP-SGD local round of a demo node (FFA-LoRA, SGD), in seconds."""
    import tempfile
    import warnings

    from fedtune.common.training.config import load_config
    from fedtune.common.training.federated_data import node_splits
    from fedtune.common.training.node import NodePolicy, prepare, train_round
    from fedtune.simulations.run import read_scenario

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
    ap.add_argument("--fixed", type=int, nargs="+", default=[10, 50, 100], help="fixed cohort sizes")
    ap.add_argument("--population", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--values", type=int, default=38_790, help="update length (demo FFA-LoRA: 38,790)")
    ap.add_argument("--no-training", action="store_true", help="skip timing a real local training round")
    args = ap.parse_args()
    train_s = None if args.no_training else local_round_seconds()
    print(f"update of {args.values:,} values; plain FedAvg upload {4 * args.values + 8:,} bytes per node; "
          f"{args.rounds} rounds each")
    if train_s:
        print(f"one local DP training round of a demo node (1 thread): {train_s:.2f}s")
    runs = [run("fixed", population=n, cohort=n, d=args.values, rounds=args.rounds) for n in args.fixed]
    runs.append(run("sampled", population=args.population, cohort=max(3, round(args.fraction * args.population)),
                    d=args.values, rounds=args.rounds))
    print(f"{'cohort':<22}{'k':>4}{'t':>4}{'exch':>6}{'node KB':>9}{'x plain':>8}{'node ms':>9}{'% train':>8}"
          f"{'server MB':>10}{'server ms':>10}{'plain ms':>9}{'max err':>9}")
    for r in runs:
        label = (f"fixed {r['cohort']}" if r["mode"] == "fixed" else
                 f"sampled {r['cohort']} of {r['population']}")
        pct = f"{100 * r['node_ms'] / 1000 / train_s:.1f}" if train_s else "-"
        print(f"{label:<22}{r['degree']:>4}{r['t']:>4}{r['exchanges']:>6.1f}{r['node_bytes'] / 1e3:>9.1f}"
              f"{r['node_bytes'] / r['plain_node_bytes']:>8.3f}{r['node_ms']:>9.1f}{pct:>8}"
              f"{r['server_bytes'] / 1e6:>10.2f}{r['server_ms']:>10.1f}{r['plain_server_ms']:>9.2f}"
              f"{r['max_err']:>9.1e}")
    print("node KB / ms: one participating node's protocol traffic and CPU per round it takes part in (key set-up "
          "included; a fixed cohort sets up once over all rounds); x plain: against a plain FedAvg upload. "
          "server: all protocol traffic and the server's CPU per round. max err: largest difference between the "
          "unmasked weighted mean and plain FedAvg's (quantization).")


if __name__ == "__main__":
    main()
