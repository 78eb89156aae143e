"""Secure aggregation as the server's aggregation step (protocol in ``common/secagg.py``).

Exchanges: a key epoch costs two (``query.secagg_keys``: nodes advertise public
keys; ``query.secagg_join``: the roster goes out, encrypted key shares come
back) and happens in the first round and after any round whose dropouts forced
the server to reconstruct a node's mask key. Every round then costs the
``train`` exchange (masked upload + encrypted self-mask shares) and one
``query.secagg_unmask`` exchange. The server never sees an individual update.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.serverapp import Grid

from common import aggregate
from common import secagg as sa
from server.aggregation import RoundOutcome
from server.messages import NodeReply, array_record, config_record, exchange

log = logging.getLogger(__name__)


class SecureFedAvg:
    """FedAvg where the server learns only the (weighted) sum of the sampled nodes' updates."""

    name = "secagg+"
    secure = True

    def __init__(self, *, weighting: str, min_nodes: int, timeout: float, clip: float, max_weight: int,
                 threshold: float, degree: int, seed: int = 0) -> None:
        self.weighting, self.min_nodes, self.timeout = weighting, min_nodes, timeout
        self.clip, self.threshold, self.degree, self.seed = clip, threshold, degree or None, seed
        self.max_weight = 1 if weighting == "uniform" else max_weight
        self.epoch: sa.Epoch | None = None
        self.index: dict[int, int] = {}  # Flower node id -> roster index
        self.joined: set[int] = set()  # roster indices that sent their key shares
        self.rekey = True
        self._ids: dict = {}

    # -- key epochs -----------------------------------------------------------
    def _setup(self, grid: Grid, node_ids: list[int], names: dict[int, str], server_round: int) -> list[NodeReply]:
        number = (self.epoch.number + 1) if self.epoch else 1
        index = {nid: i for i, nid in enumerate(sorted(node_ids))}
        conf = lambda nid: {"secagg": config_record({**self._ids, "epoch": number, "index": index[nid]})}  # noqa: E731
        replies = exchange(grid, node_ids=node_ids, message_type="query.secagg_keys", content=conf,
                           timeout=self.timeout, group=f"keys-{server_round}", names=names)
        roster = {}
        for r in replies:
            rec = r.content.config_records.get("secagg") if r.ok and r.content else None
            if rec is not None:
                roster[index[r.node_id]] = (bytes(rec["s_pk"]), bytes(rec["c_pk"]))
        epoch = sa.Epoch.create(number, roster, degree=self.degree, threshold_fraction=self.threshold,
                                seed=self.seed)
        ids = sorted(roster)
        joined: set[int] = set()

        def roster_msg(nid: int) -> dict:
            i = index[nid]
            return {"secagg": config_record({
                **self._ids, "epoch": number, "index": i, "threshold": epoch.threshold, "indices": ids,
                "s_pks": [roster[j][0] for j in ids], "c_pks": [roster[j][1] for j in ids],
                "neighbours": epoch.neighbours[i]})}

        members = [nid for nid in node_ids if index[nid] in roster]
        shares = exchange(grid, node_ids=members, message_type="query.secagg_join", content=roster_msg,
                          timeout=self.timeout, group=f"join-{server_round}", names=names)
        for r in shares:
            rec = r.content.config_records.get("secagg") if r.ok and r.content else None
            if rec is None:
                continue
            try:
                epoch.store_shares(index[r.node_id], dict(zip(rec["to"], [bytes(b) for b in rec["blob"]],
                                                              strict=True)))
                joined.add(index[r.node_id])
            except (sa.SecAggError, ValueError) as e:
                r.status, r.reason = "error", f"bad key shares: {e}"
        self.epoch, self.index, self.joined, self.rekey = epoch, index, joined, False
        log.info("secure aggregation: key epoch %d with %d nodes (degree %d, threshold %d)", number, len(joined),
                 len(next(iter(epoch.neighbours.values()), [])), epoch.threshold)
        return [r for r in replies + shares if not r.ok]

    # -- one round ------------------------------------------------------------
    def run_round(self, grid: Grid, *, server_round: int, node_ids: list[int], global_arrays: dict[str, np.ndarray],
                  config: dict, names: dict[int, str]) -> RoundOutcome:
        exchanges, setup_failures = 0, []
        self._ids = {k: config[k] for k in ("job", "run-dir") if k in config}  # nodes locate their state by these
        if self.rekey or self.epoch is None or any(nid not in self.index for nid in node_ids):
            everyone = sorted(set(grid.get_node_ids()) | set(node_ids))
            setup_failures = self._setup(grid, everyone, names, server_round)
            exchanges += 2
        assert self.epoch is not None
        parts = sorted(self.index[nid] for nid in node_ids if self.index.get(nid) in self.joined)
        by_index = {self.index[nid]: nid for nid in node_ids if nid in self.index}
        if len(parts) < self.min_nodes:
            return RoundOutcome(None, setup_failures, 0, 0, exchanges,
                                f"only {len(parts)} nodes completed the key set-up (fed.min-nodes={self.min_nodes})")
        L = sa.levels(n_nodes=len(parts), max_weight=self.max_weight)
        arrays = array_record(global_arrays)
        base = {**config, "epoch": self.epoch.number, "participants": parts, "clip": self.clip, "levels": L,
                "max-weight": self.max_weight, "weighting": self.weighting}
        train_ids = [by_index[i] for i in parts]
        replies = exchange(grid, node_ids=train_ids, message_type="train", timeout=self.timeout,
                           group=f"round-{server_round}", names=names,
                           content=lambda nid: {"arrays": arrays, "config": config_record(
                               {**base, "index": self.index[nid]})})
        exchanges += 1
        length = sum(v.size for v in global_arrays.values()) + 1
        uploads, b_shares = {}, {}
        for r in replies:
            if not r.ok:
                continue
            rec = r.content.config_records.get("secagg") if r.content else None
            masked = r.content.array_records.get("masked") if r.content else None
            vec = masked["masked"].numpy() if masked is not None and "masked" in masked else None
            if rec is None or vec is None or vec.dtype != np.uint32 or vec.size != length:
                r.status, r.reason = "error", "malformed masked upload"
                continue
            i = self.index[r.node_id]
            uploads[i] = vec
            b_shares[i] = dict(zip(rec["to"], [bytes(b) for b in rec["blob"]], strict=True))
        sent = arrays.count_bytes() * len(train_ids)
        received = sum(r.bytes for r in replies)
        all_replies = setup_failures + replies
        if len(uploads) < self.min_nodes:
            return RoundOutcome(None, all_replies, sent, received, exchanges,
                                f"only {len(uploads)} of {len(parts)} nodes uploaded a masked update "
                                f"(fed.min-nodes={self.min_nodes})")
        plan = sa.plan_unmask(self.epoch, participants=parts, uploads=uploads, b_shares=b_shares)

        def unmask_msg(nid: int) -> dict:
            b, s = plan.requests[self.index[nid]]
            return {"secagg": config_record({
                **self._ids, "epoch": self.epoch.number, "round": server_round, "uploaded": plan.uploaded,
                "dropped": plan.dropped, "b_from": list(b), "b_blob": list(b.values()),
                "s_from": list(s), "s_blob": list(s.values())})}

        holders = [by_index[i] for i in plan.uploaded]
        answers = exchange(grid, node_ids=holders, message_type="query.secagg_unmask", content=unmask_msg,
                           timeout=self.timeout, group=f"unmask-{server_round}", names=names)
        exchanges += 1
        received += sum(a.bytes for a in answers)
        revealed = {}
        for a in answers:
            rec = a.content.config_records.get("secagg") if a.ok and a.content else None
            if rec is None:
                continue
            revealed[self.index[a.node_id]] = (
                dict(zip(rec["b_from"], [bytes(x) for x in rec["b_share"]], strict=True)),
                dict(zip(rec["s_from"], [bytes(x) for x in rec["s_share"]], strict=True)))
        if plan.dropped:
            self.rekey = True  # their mask keys are (about to be) known to the server: retire this epoch
        try:
            total = sa.unmask(self.epoch, server_round, plan=plan, uploads=uploads, revealed=revealed)
        except sa.SecAggError as e:
            self.rekey = True
            return RoundOutcome(None, all_replies, sent, received, exchanges, f"secure aggregation failed: {e.problem}")
        summed, weight = sa.split_sum(total)
        if weight <= 0:
            return RoundOutcome(None, all_replies, sent, received, exchanges, "secure aggregation: zero total weight")
        vec = sa.dequantize_sum(summed, clip=self.clip, levels_=L)
        new = aggregate.apply(global_arrays, sa.unflatten(vec, global_arrays), float(weight))
        extra = {"dropped_after_upload": [names.get(by_index[i], str(i)) for i in plan.uploaded
                                          if i not in revealed], "weight_sum": weight, "levels": L,
                 "epoch": self.epoch.number}
        for r in replies:  # under secure aggregation a node's weight is not sent in the clear
            r.metrics.setdefault("weight", None)
        return RoundOutcome(new, all_replies, sent, received, exchanges, extra=extra)

