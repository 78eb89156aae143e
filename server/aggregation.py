"""The aggregation step of a round: the seam where secure aggregation plugs in.

An aggregator gets the round's sampled nodes and the global adapter, runs
whatever message exchange it needs, and returns the new global adapter (or None
when the round fails) with every node's outcome. ``PlainFedAvg`` sends the
adapter, receives each node's update in the clear, and averages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from fedtune.common.errors import AdapterError
from fedtune.common.training import aggregate
from fedtune.common.training.adapter import check_arrays
from fedtune import envelope
from fedtune.common.training.wire import NodeRoundResult
from fedtune.server.messages import NodeReply, exchange
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    new_arrays: dict[str, np.ndarray] | None  # None: round failed, model unchanged
    replies: list[NodeReply]  # every reply; a training reply's ``result`` is its parsed NodeRoundResult
    bytes_sent: int
    bytes_received: int
    exchanges: int  # message exchanges (round trips) used
    reason: str = ""  # why the round failed
    extra: dict = field(default_factory=dict)
    later: list[NodeReply] = field(default_factory=list)  # refusals after a node's training reply (e.g. unmasking)


@runtime_checkable
class Aggregator(Protocol):
    """The aggregation step of a round: what ``Federation`` needs from plain or secure FedAvg."""

    name: str  # recorded in rounds.jsonl
    secure: bool  # whether the server sees only the sum of updates

    def run_round(self, grid: Grid, *, server_round: int, node_ids: list[int], global_arrays: dict[str, np.ndarray],
                  config: dict, names: dict[int, str]) -> RoundOutcome:
        """Exchange whatever messages the step needs with ``node_ids``; the new global tensors or None."""
        ...


class PlainFedAvg:
    """FedAvg with updates in the clear (weighted by training records, or uniform)."""

    name = "fedavg"
    secure = False

    def __init__(self, *, weighting: str, min_nodes: int, timeout: float) -> None:
        self.weighting, self.min_nodes, self.timeout = weighting, min_nodes, timeout

    def run_round(self, grid: Grid, *, server_round: int, node_ids: list[int], global_arrays: dict[str, np.ndarray],
                  config: dict, names: dict[int, str]) -> RoundOutcome:
        arrays = envelope.array_record(global_arrays)
        replies = train_replies(exchange(grid, node_ids=node_ids, message_type=envelope.TRAIN, timeout=self.timeout,
                                         group=f"round-{server_round}", names=names,
                                         content=envelope.request(arrays=arrays, task=config)))
        sent = arrays.count_bytes() * len(node_ids)
        received = sum(r.bytes for r in replies)
        ok = [r for r in replies if r.ok and valid_update(r, global_arrays)]
        if len(ok) < self.min_nodes:
            return RoundOutcome(None, replies, sent, received, 1,
                                f"only {len(ok)} of {len(node_ids)} nodes returned an update (fed.min-nodes="
                                f"{self.min_nodes})")
        updates = [r.result.update for r in ok]
        weights = [aggregate.node_weight(r.result.weight or 0, self.weighting) for r in ok]
        if sum(weights) <= 0:
            return RoundOutcome(None, replies, sent, received, 1, "total aggregation weight is zero")
        return RoundOutcome(aggregate.fedavg(global_arrays, updates, weights), replies, sent, received, 1)


def train_replies(replies: list[NodeReply], *, clear: bool = True) -> list[NodeReply]:
    """Each training reply's result parsed once (figures; with ``clear``, the update that travelled in the clear:
    under secure aggregation nothing in the clear is read). Arrays that do not decode mark their node failed,
    never stop the round."""
    for r in replies:
        update = None
        if clear and r.ok:
            try:
                update = envelope.reply_update(r.content)
            except Exception as e:  # noqa: BLE001 - bytes from the network that do not decode
                r.status, r.reason = "error", f"malformed update ({e.__class__.__name__})"
        r.result = NodeRoundResult.from_record(r.metrics, update)
        r.has_update = update is not None
    return replies


def valid_update(reply: NodeReply, global_arrays: dict[str, np.ndarray]) -> bool:
    """Whether a reply carries a well-formed update; a malformed one marks the node as failed."""
    if reply.result is None or not reply.has_update:
        reply.status, reply.reason = "error", "reply carried no update"
        return False
    try:
        check_arrays(reply.result.update, {k: v.shape for k, v in global_arrays.items()})
    except AdapterError as e:
        reply.status, reply.reason = "error", f"malformed update: {e.problem}"
        return False
    return True
