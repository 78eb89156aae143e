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
from dataclasses import dataclass, field

import numpy as np
from fedtune import envelope
from fedtune.common.secagg import codec
from fedtune.common.secagg import protocol as sa
from fedtune.common.secagg.limits import effective_max_weight
from fedtune.common.training import aggregate
from fedtune.common.training.wire import RoundTask
from fedtune.server.aggregation import RoundOutcome, train_replies
from fedtune.server.messages import NodeReply, exchange
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
        self.max_weight = effective_max_weight(weighting, max_weight)
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
            replies = exchange(grid, node_ids=cohort, message_type=envelope.SECAGG_KEYS, timeout=self.timeout,
                               group=f"keys-{server_round}", names=names, content=envelope.request(secagg=wire))
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
            join = envelope.request(secagg=codec.join_request(params, adverts))
            shares = exchange(grid, node_ids=cohort, message_type=envelope.SECAGG_JOIN, content=join,
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

    # -- one round: the protocol's stages ---------------------------------------
    def run_round(self, grid: Grid, *, server_round: int, node_ids: list[int], global_arrays: dict[str, np.ndarray],
                  config: dict, names: dict[int, str]) -> RoundOutcome:
        rnd = _Round(t0=time.perf_counter(), names=names, group=server_round)
        cohort = sorted(node_ids)
        if self.rekey or self.epoch is None or list(self.epoch.params.cohort) != cohort:
            self.epoch, rnd.failures, rnd.exchanges = self._setup(grid, RoundTask.from_record(config).job, cohort, names,
                                                                  server_round)
            self.rekey = self.epoch is None
        rnd.t_setup = time.perf_counter()
        if self.epoch is None:
            return RoundOutcome(None, rnd.failures, 0, 0, rnd.exchanges,
                                f"fewer than fed.min-nodes={self.min_nodes} nodes completed the key set-up")
        rnd.epoch, rnd.p = self.epoch, dataclasses.replace(self.epoch.params, round=server_round)
        uploads = self._train(grid, rnd, global_arrays, config)
        if len(uploads) < len(rnd.p.cohort):
            self.rekey = True  # dropped nodes' mask keys will be revealed (nodes end the epoch themselves too)
        if len(uploads) < self.min_nodes:
            return self._failed(rnd, f"only {len(uploads)} of {len(rnd.p.cohort)} nodes uploaded a masked update "
                                     f"(fed.min-nodes={self.min_nodes})")
        survivor_sigs = self._consistency(grid, rnd, sorted(uploads))
        if survivor_sigs is None:
            return self._failed(rnd, "secure aggregation failed: not every survivor signed the survivor set (a "
                                     "node dropped during the consistency check)")
        revealed = self._unmask_requests(grid, rnd, uploads, survivor_sigs)
        try:
            total = sa.unmask(rnd.epoch, rnd.p, uploads=uploads, revealed=revealed)
        except sa.SecAggError as e:
            return self._failed(rnd, f"secure aggregation failed: {e.problem}")
        summed, weight = sa.split_sum(total)
        if weight <= 0:
            return self._failed(rnd, "secure aggregation: zero total weight")
        vec = sa.dequantize_sum(summed, clip=rnd.p.clip, levels_=rnd.p.levels)
        new = aggregate.apply(global_arrays, sa.unflatten(vec, global_arrays), float(weight))
        return RoundOutcome(new, rnd.failures + rnd.replies, rnd.sent, rnd.received, rnd.exchanges,
                            extra=self._figures(rnd, uploads, revealed, weight), later=rnd.later)

    def _train(self, grid: Grid, rnd: _Round, global_arrays: dict[str, np.ndarray], config: dict
               ) -> dict[int, sa.Upload]:
        """The ``train`` exchange: every cohort node's masked upload, checked (a bad one marks its node failed)."""
        p, cohort = rnd.p, list(rnd.p.cohort)
        arrays = envelope.array_record(global_arrays)
        rnd.replies = train_replies(clear=False, replies=exchange(
            grid, node_ids=cohort, message_type=envelope.TRAIN, timeout=self.timeout, group=f"round-{rnd.group}",
            names=rnd.names, content=envelope.request(arrays=arrays, task=config, secagg=codec.params_to_wire(p))))
        rnd.t_train = time.perf_counter()
        rnd.exchanges += 1
        rnd.sent = arrays.count_bytes() * len(cohort)
        rnd.received = sum(r.bytes for r in rnd.replies)
        length = sum(v.size for v in global_arrays.values()) + 1
        uploads: dict[int, sa.Upload] = {}
        for r in rnd.replies:
            if not r.ok:
                continue
            try:
                up = codec.upload_from_wire(_secagg(r), envelope.reply_masked(r.content))
            except (sa.SecAggError, KeyError, TypeError, ValueError, AttributeError) as e:
                _fail(r, f"malformed masked upload ({e.__class__.__name__})")
                continue
            problem = sa.check_upload(rnd.epoch, p, r.node_id, up, length)
            if problem:
                _fail(r, problem)
                continue
            uploads[r.node_id] = up
        return uploads

    def _consistency(self, grid: Grid, rnd: _Round, up_ids: list[int]) -> dict[int, bytes] | None:
        """SecAgg's consistency round, only when nodes dropped: every survivor signs the one survivor set it
        accepts. The signatures ({} when nobody dropped), or None when a survivor did not sign."""
        if not sorted(set(rnd.p.cohort) - set(up_ids)):
            return {}
        answers = exchange(grid, node_ids=up_ids, message_type=envelope.SECAGG_CONSISTENCY,
                           content=envelope.request(secagg=codec.consistency_request(rnd.p, up_ids)),
                           timeout=self.timeout, group=f"consistency-{rnd.group}", names=rnd.names)
        rnd.exchanges += 1
        rnd.received += sum(a.bytes for a in answers)
        sigs: dict[int, bytes] = {}
        for a in answers:
            try:
                sigs[a.node_id] = codec.signature_from_wire(_secagg(a))
            except (sa.SecAggError, KeyError, TypeError, ValueError):
                _fail(a, "no survivor-set signature")
        rnd.later += [a for a in answers if not a.ok]
        return sigs if sorted(sigs) == up_ids else None

    def _unmask_requests(self, grid: Grid, rnd: _Round, uploads: dict[int, sa.Upload],
                         survivor_sigs: dict[int, bytes]) -> dict:
        """The ``unmask`` exchange: each survivor gets the shares it holds for the others and reveals what its own
        rules allow; what it revealed per node."""
        up_ids = sorted(uploads)
        dropped = sorted(set(rnd.p.cohort) - set(up_ids))
        sigs = {u: uploads[u].sig for u in up_ids}

        def request(h: int):
            b = {o: uploads[o].shares[h] for o in up_ids if h in uploads[o].shares}
            s = {d: rnd.epoch.s_shares[h][d] for d in dropped if d in rnd.epoch.s_shares.get(h, {})}
            req = codec.UnmaskRequest(params=rnd.p, uploaded=up_ids, sigs=sigs, survivor_sigs=survivor_sigs,
                                      b_shares=b, s_shares=s)
            return envelope.request(secagg=codec.unmask_request(req))

        answers = exchange(grid, node_ids=up_ids, message_type=envelope.SECAGG_UNMASK, content=request,
                           timeout=self.timeout, group=f"unmask-{rnd.group}", names=rnd.names)
        rnd.exchanges += 1
        rnd.received += sum(a.bytes for a in answers)
        revealed = {}
        for a in answers:
            try:
                revealed[a.node_id] = codec.reveal_from_wire(_secagg(a))
            except sa.SecAggError as e:
                _fail(a, f"unusable shares: {e.problem}")
        rnd.later += [a for a in answers if not a.ok]
        return revealed

    def _failed(self, rnd: _Round, reason: str) -> RoundOutcome:
        self.rekey = True
        return RoundOutcome(None, rnd.failures + rnd.replies, rnd.sent, rnd.received, rnd.exchanges, reason,
                            later=rnd.later)

    @staticmethod
    def _figures(rnd: _Round, uploads: dict, revealed: dict, weight: int) -> dict:
        """What the round record keeps of secure aggregation (no node's update: the sum's parameters)."""
        p, cohort, names = rnd.p, list(rnd.p.cohort), rnd.names
        up_ids = sorted(uploads)
        return {"epoch": p.epoch, "cohort": len(cohort), "degree": sa.effective_degree(len(cohort), p.degree),
                "threshold": p.threshold, "levels": p.levels, "weight_sum": weight,
                "dropped": [names.get(d, str(d)) for d in sorted(set(cohort) - set(up_ids))],
                "dropped_after_upload": [names.get(u, str(u)) for u in up_ids if u not in revealed],
                "timing": {"key_setup": round(rnd.t_setup - rnd.t0, 3), "train": round(rnd.t_train - rnd.t_setup, 3),
                           "secure_aggregation": round(time.perf_counter() - rnd.t_train, 3)}}


@dataclass
class _Round:
    """One secure round's running state across its stages."""

    t0: float
    names: dict[int, str]
    group: int  # the server round (message group ids)
    t_setup: float = 0.0
    t_train: float = 0.0
    epoch: sa.Epoch | None = None
    p: sa.Params | None = None
    failures: list[NodeReply] = field(default_factory=list)  # key set-up failures
    replies: list[NodeReply] = field(default_factory=list)  # the train exchange's replies
    later: list[NodeReply] = field(default_factory=list)  # refusals after a node's training reply
    exchanges: int = 0
    sent: int = 0
    received: int = 0


def _secagg(reply: NodeReply):
    rec = envelope.secagg_record(reply.content) if reply.ok else None
    if rec is None:
        raise sa.SecAggError("the reply carried no secure-aggregation record", "")
    return rec


def _fail(reply: NodeReply, reason: str) -> None:
    if reply.ok:
        reply.status, reply.reason = "error", reason
