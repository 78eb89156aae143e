"""Message exchange helpers for the server: send to nodes, sort replies into ok / failed / dropped.

Messages are built and opened by ``fedtune.envelope`` (the one place their types and record names are spelled)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fedtune import envelope
from fedtune.common.errors import FedtuneError
from flwr.app import Message, RecordDict
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
    result: Any = None  # a training reply's NodeRoundResult, parsed once (``aggregation.train_replies``)
    has_update: bool = False  # whether a training reply carried its update in the clear

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def wait_for_nodes(grid: Grid, *, wanted: int, minimum: int, timeout: float,
                   on_count: Callable[[int], None] | None = None) -> list[int]:
    """Connected node ids: waits up to ``timeout`` for ``wanted`` (Flower may report none at first),
    then settles for ``minimum``; fewer than that is an error. ``on_count`` hears each new count while waiting."""
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        ids = sorted(grid.get_node_ids())
        if on_count is not None and len(ids) != seen:
            seen = len(ids)
            on_count(seen)
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
    """Push ``content`` (an ``envelope.request``, or a function of the node id giving one) to every node without
    waiting: the server can do its own work while the nodes do theirs, then :func:`collect` the replies."""
    node_ids = list(node_ids)
    make = content if callable(content) else (lambda nid: content)
    msgs = [Message(make(nid), dst_node_id=nid, message_type=message_type, group_id=group)
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
        info = envelope.reply_info(r.content, name)
        if names is not None:
            names[nid] = info.name
        out.append(NodeReply(nid, info.name, info.status, info.reason, envelope.reply_metrics(r.content), r.content,
                             envelope.content_bytes(r.content), info.accountant))
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

