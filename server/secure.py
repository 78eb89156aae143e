"""Secure aggregation as the server's aggregation step (protocol and message layout in ``common/secagg/``).

The server proposes; nodes verify. A key epoch is set up among the round's cohort (the
nodes asked to train): ``query.secagg_keys`` (nodes check the proposed cohort, graph and
threshold against their own rules, and advertise signed public keys) and
``query.secagg_join`` (nodes check every key, compute their own neighbours and return
sealed mask-key shares). The epoch is reused for the next round only while the cohort is
unchanged and nobody dropped (cross-silo, ``fed.fraction-train=1``); a sampled round sets
up its own. Every round then costs the ``train`` exchange (masked upload, sealed self-mask
shares, a commitment and a signature over the round's parameters), a
``query.secagg_consistency`` exchange only when nodes dropped (survivors sign the survivor
set), and ``query.secagg_unmask``. The server never sees an individual update; a malformed
or inconsistent reply marks that node failed and never crashes the round loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from fedtune.common.secagg import codec
from fedtune.common.secagg import protocol as sa
from fedtune.common.training import aggregate
from fedtune.server.aggregation import RoundOutcome
from fedtune.server.messages import NodeReply, array_record, config_record, exchange
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

SETUP_ATTEMPTS = 2  # a key epoch is retried once without the nodes that failed to join


class SecureFedAvg:
    """FedAvg where the server learns only the (weighted) sum of the sampled nodes' updates."""

    name = "secagg+"
    secure = True

    def __init__(self, *, weighting: str, min_nodes: int, timeout: float, clip: float, max_weight: int,
                 threshold: float, degree: int, seed: int = 0) -> None:
        self.weighting, self.min_nodes, self.timeout = weighting, min_nodes, timeout
        self.clip, self.threshold_fraction, self.degree, self.seed = clip, threshold, degree or None, seed
        self.max_weight = 1 if weighting == "uniform" else max_weight
        self.epoch: sa.Epoch | None = None
        self.epochs = 0
        self.rekey = True

    # -- key epochs -----------------------------------------------------------
    def _propose(self, job: str, cohort: list[int], server_round: int) -> sa.Params:
        self.epochs += 1
        n = len(cohort)
        degree = sa.default_degree(n) if self.degree is None else min(self.degree, n - 1)
        k = sa.effective_degree(n, degree)
        return sa.Params(job=job, epoch=self.epochs, cohort=tuple(sorted(cohort)), seed=0, degree=degree,
                         threshold=sa.threshold(k, self.threshold_fraction), clip=self.clip,
                         max_weight=self.max_weight, weighting=self.weighting)

    def _setup(self, grid: Grid, job: str, cohort: list[int], names: dict[int, str], server_round: int
               ) -> tuple[sa.Epoch | None, list[NodeReply], int]:
        """A key epoch among ``cohort`` (retried without nodes that fail); (epoch or None, failures, exchanges)."""
        failures: list[NodeReply] = []
        exchanges = 0
        for _ in range(SETUP_ATTEMPTS):
            if len(cohort) < self.min_nodes:
                break
            params = self._propose(job, cohort, server_round)
            wire = codec.params_to_wire(params)
            replies = exchange(grid, node_ids=cohort, message_type="query.secagg_keys", timeout=self.timeout,
                               group=f"keys-{server_round}", names=names, content={"secagg": config_record(wire)})
            exchanges += 1
            adverts = {}
            for r in replies:
                try:
                    a = codec.advert_from_wire(_secagg(r))
                    if a.node != r.node_id:
                        raise sa.SecAggError("keys advertised under another node id", "")
                    adverts[r.node_id] = a
                except sa.SecAggError as e:
                    _fail(r, f"no usable keys: {e.problem}")
            failures += [r for r in replies if not r.ok]
            if sorted(adverts) != cohort:  # the cohort is part of the signed parameters: propose it again
                cohort = sorted(adverts)
                continue
            params = dataclasses.replace(params, seed=sa.graph_seed(job, params.epoch, adverts))
            epoch = sa.Epoch(params=params, adverts=adverts)
            join = {"secagg": config_record(codec.join_request(params, adverts))}
            shares = exchange(grid, node_ids=cohort, message_type="query.secagg_join", content=join,
                              timeout=self.timeout, group=f"join-{server_round}", names=names)
            exchanges += 1
            for r in shares:
                try:
                    epoch.store_shares(r.node_id, codec.shares_from_wire(_secagg(r)))
                except sa.SecAggError as e:
                    _fail(r, f"no usable key shares: {e.problem}")
            failures += [r for r in shares if not r.ok]
            joined = sorted(r.node_id for r in shares if r.ok)
            if joined == cohort:
                log.info("secure aggregation: key epoch %d among %d nodes (degree %d, threshold %d)", params.epoch,
                         len(cohort), sa.effective_degree(len(cohort), params.degree), params.threshold)
                return epoch, failures, exchanges
            cohort = joined
        return None, failures, exchanges

    # -- one round ------------------------------------------------------------
    def run_round(self, grid: Grid, *, server_round: int, node_ids: list[int], global_arrays: dict[str, np.ndarray],
                  config: dict, names: dict[int, str]) -> RoundOutcome:
        job = str(config["job"])
        cohort = sorted(node_ids)
        exchanges, failures = 0, []
        t0 = time.perf_counter()
        if self.rekey or self.epoch is None or list(self.epoch.params.cohort) != cohort:
            self.epoch, failures, exchanges = self._setup(grid, job, cohort, names, server_round)
            self.rekey = self.epoch is None
        t_setup = time.perf_counter()
        if self.epoch is None:
            return RoundOutcome(None, failures, 0, 0, exchanges,
                                f"fewer than fed.min-nodes={self.min_nodes} nodes completed the key set-up")
        epoch = self.epoch
        p = dataclasses.replace(epoch.params, round=server_round)
        cohort = list(p.cohort)
        arrays = array_record(global_arrays)
        train_msg = {"arrays": arrays, "config": config_record(config), "secagg": config_record(codec.params_to_wire(p))}
        replies = exchange(grid, node_ids=cohort, message_type="train", timeout=self.timeout,
                           group=f"round-{server_round}", names=names, content=train_msg)
        t_train = time.perf_counter()
        exchanges += 1
        length = sum(v.size for v in global_arrays.values()) + 1
        uploads: dict[int, sa.Upload] = {}
        for r in replies:
            if not r.ok:
                continue
            try:
                rec = _secagg(r)
                masked = r.content.array_records["masked"]["masked"].numpy()
                up = codec.upload_from_wire(rec, masked)
            except (sa.SecAggError, KeyError, TypeError, ValueError, AttributeError) as e:
                _fail(r, f"malformed masked upload ({e.__class__.__name__})")
                continue
            problem = sa.check_upload(epoch, p, r.node_id, up, length)
            if problem:
                _fail(r, problem)
                continue
            uploads[r.node_id] = up
        sent = arrays.count_bytes() * len(cohort)
        received = sum(r.bytes for r in replies)
        all_replies = failures + replies
        later: list[NodeReply] = []
        if len(uploads) < len(cohort):
            self.rekey = True  # dropped nodes' mask keys will be revealed (nodes end the epoch themselves too)

        def failed(reason: str) -> RoundOutcome:
            self.rekey = True
            return RoundOutcome(None, all_replies, sent, received, exchanges, reason, later=later)

        if len(uploads) < self.min_nodes:
            return failed(f"only {len(uploads)} of {len(cohort)} nodes uploaded a masked update "
                          f"(fed.min-nodes={self.min_nodes})")
        up_ids = sorted(uploads)
        dropped = sorted(set(cohort) - set(up_ids))
        survivor_sigs: dict[int, bytes] = {}
        if dropped:  # SecAgg's consistency round: every survivor signs the one survivor set it accepts
            check = {"secagg": config_record(codec.consistency_request(p, up_ids))}
            answers = exchange(grid, node_ids=up_ids, message_type="query.secagg_consistency", content=check,
                               timeout=self.timeout, group=f"consistency-{server_round}", names=names)
            exchanges += 1
            received += sum(a.bytes for a in answers)
            for a in answers:
                try:
                    survivor_sigs[a.node_id] = codec.signature_from_wire(_secagg(a))
                except (sa.SecAggError, KeyError, TypeError, ValueError):
                    _fail(a, "no survivor-set signature")
            later += [a for a in answers if not a.ok]
            if sorted(survivor_sigs) != up_ids:
                return failed("secure aggregation failed: not every survivor signed the survivor set (a node "
                              "dropped during the consistency check)")
        sigs = {u: uploads[u].sig for u in up_ids}

        def unmask_msg(h: int) -> dict:
            b = {o: uploads[o].shares[h] for o in up_ids if h in uploads[o].shares}
            s = {d: epoch.s_shares[h][d] for d in dropped if d in epoch.s_shares.get(h, {})}
            req = codec.UnmaskRequest(params=p, uploaded=up_ids, sigs=sigs, survivor_sigs=survivor_sigs, b_shares=b,
                                      s_shares=s)
            return {"secagg": config_record(codec.unmask_request(req))}

        answers = exchange(grid, node_ids=up_ids, message_type="query.secagg_unmask", content=unmask_msg,
                           timeout=self.timeout, group=f"unmask-{server_round}", names=names)
        exchanges += 1
        received += sum(a.bytes for a in answers)
        revealed = {}
        for a in answers:
            try:
                rec = _secagg(a)
                revealed[a.node_id] = codec.reveal_from_wire(rec)
            except sa.SecAggError as e:
                _fail(a, f"unusable shares: {e.problem}")
        later += [a for a in answers if not a.ok]
        try:
            total = sa.unmask(epoch, p, uploads=uploads, revealed=revealed)
        except sa.SecAggError as e:
            return failed(f"secure aggregation failed: {e.problem}")
        summed, weight = sa.split_sum(total)
        if weight <= 0:
            return failed("secure aggregation: zero total weight")
        vec = sa.dequantize_sum(summed, clip=p.clip, levels_=p.levels)
        new = aggregate.apply(global_arrays, sa.unflatten(vec, global_arrays), float(weight))
        extra = {"epoch": p.epoch, "cohort": len(cohort), "degree": sa.effective_degree(len(cohort), p.degree),
                 "threshold": p.threshold, "levels": p.levels, "weight_sum": weight,
                 "dropped": [names.get(d, str(d)) for d in dropped],
                 "dropped_after_upload": [names.get(u, str(u)) for u in up_ids if u not in revealed],
                 "timing": {"key_setup": round(t_setup - t0, 3), "train": round(t_train - t_setup, 3),
                            "secure_aggregation": round(time.perf_counter() - t_train, 3)}}
        return RoundOutcome(new, all_replies, sent, received, exchanges, extra=extra, later=later)


def _secagg(reply: NodeReply):
    rec = reply.content.config_records.get("secagg") if reply.ok and reply.content is not None else None
    if rec is None:
        raise sa.SecAggError("the reply carried no secure-aggregation record", "")
    return rec


def _fail(reply: NodeReply, reason: str) -> None:
    if reply.ok:
        reply.status, reply.reason = "error", reason
