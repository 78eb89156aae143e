"""Message exchange helpers for the server: send to nodes, sort replies into ok / failed / dropped."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from fedtune.common.errors import FedtuneError
from fedtune.common.training.wire import NodeInfo
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


@dataclass
class NodeReply:
    """One node's answer to a request (or the lack of one)."""

    node_id: int
    name: str
    status: str  # ok | refused | unsafe | error | dropped
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    content: RecordDict | None = None
    bytes: int = 0
    accountant: str | None = None  # the accountant the node's epsilon figures come from (its own, when deployed)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def wait_for_nodes(grid: Grid, *, wanted: int, minimum: int, timeout: float) -> list[int]:
    """Connected node ids: waits up to ``timeout`` for ``wanted`` (Flower may report none at first),
    then settles for ``minimum``; fewer than that is an error."""
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= wanted:
            return ids
        if time.monotonic() > deadline:
            if len(ids) >= minimum:
                log.warning("only %d of %d nodes connected after %.0fs; continuing", len(ids), wanted, timeout)
                return ids
            raise FedtuneError(f"only {len(ids)} node(s) connected after {timeout:.0f}s; {minimum} needed",
                               "start more SuperNodes, lower fed.min-nodes, or raise fed.node-wait-timeout")
        time.sleep(0.2)


@dataclass
class Pending:
    """Requests pushed to nodes whose replies have not been collected yet (see :func:`post`)."""

    node_ids: list[int]
    message_ids: set[str]
    deadline: float
    timeout: float


def post(grid: Grid, *, node_ids: Iterable[int], message_type: str, content, timeout: float,
         group: str) -> Pending:
    """Push ``content`` (a dict, or a function of the node id giving one) to every node without waiting: the
    server can do its own work while the nodes do theirs, then :func:`collect` the replies."""
    node_ids = list(node_ids)
    make = content if callable(content) else (lambda nid: content)
    msgs = [Message(RecordDict(dict(make(nid))), dst_node_id=nid, message_type=message_type, group_id=group)
            for nid in node_ids]
    ids = set(grid.push_messages(msgs))
    return Pending(node_ids, ids, time.monotonic() + timeout, timeout)


def collect(grid: Grid, pending: Pending, *, names: dict[int, str] | None = None) -> list[NodeReply]:
    """Pull the replies to ``pending`` until all are in or its deadline passes; classify them (missing ones
    are 'dropped')."""
    waiting, got = set(pending.message_ids), []
    while waiting:
        res = list(grid.pull_messages(waiting))
        got += res
        waiting -= {m.metadata.reply_to_message_id for m in res}
        if not waiting or time.monotonic() >= pending.deadline:
            break
        time.sleep(0.1)
    replies = {r.metadata.src_node_id: r for r in got}
    out = []
    for nid in pending.node_ids:
        name = (names or {}).get(nid, str(nid))
        r = replies.get(nid)
        if r is None:
            out.append(NodeReply(nid, name, "dropped", f"no reply within {pending.timeout:.0f}s"))
            continue
        if r.has_error():
            reason = str(r.error.reason).strip().splitlines()
            out.append(NodeReply(nid, name, "error", _last_line(reason)))
            continue
        info = NodeInfo.from_record(r.content.config_records.get("info") or ConfigRecord({}), name)
        if names is not None:
            names[nid] = info.name
        metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                   for rec in r.content.metric_records.values() for k, v in rec.items()}
        nbytes = sum(a.count_bytes() for a in r.content.array_records.values()) + sum(
            len(b) for rec in r.content.config_records.values() for v in rec.values()
            for b in (v if isinstance(v, list) else [v]) if isinstance(b, bytes))
        out.append(NodeReply(nid, info.name, info.status, info.reason, metrics, r.content, nbytes, info.accountant))
    return out


def exchange(grid: Grid, *, node_ids: Iterable[int], message_type: str, content, timeout: float,
             group: str, names: dict[int, str] | None = None) -> list[NodeReply]:
    """Send ``content`` to every node and classify the replies (:func:`post`, then :func:`collect`)."""
    return collect(grid, post(grid, node_ids=node_ids, message_type=message_type, content=content, timeout=timeout,
                              group=group), names=names)


def _last_line(lines: list[str]) -> str:
    """The informative line of a remote traceback (its last non-empty line)."""
    lines = [ln.strip(" '\"<>") for ln in lines if ln.strip(" '\"<>")]
    return (lines[-1] if lines else "unknown error")[:500]


def config_record(values: dict) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in values.items() if v is not None})
