"""A scripted server for tests: sends a node's real ClientApp whatever messages a test writes.

Tests of the node's guarantees use it the way a curious or lying server would: they build
the messages themselves (any config, any arrays, any order) and read back exactly what the
node would put on the wire. Nothing of the node is mocked.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict


class ScriptedServer:
    """Talks to one node (a ClientApp with its own node config and state) directly."""

    def __init__(self, app, *, node_config: dict, run_config: dict | None = None, node_id: int = 7) -> None:
        self.app = app
        self.node_id = node_id
        self.context = Context(run_id=1, node_id=node_id, node_config=dict(node_config), state=RecordDict(),
                               run_config=dict(run_config or {}))
        self.sent: list[Message] = []

    def send(self, message_type: str, *, config: dict[str, Any] | None = None, record: str = "config",
             arrays: dict[str, np.ndarray] | None = None, extra: dict[str, dict[str, Any]] | None = None) -> Message:
        """Deliver one message to the node; returns its reply exactly as it would leave the node.

        ``extra``: more config records by name (records a fedtune server would not send, or would send
        elsewhere)."""
        content = RecordDict()
        if config is not None:
            content[record] = ConfigRecord(config)
        for name, rec in (extra or {}).items():
            content[name] = ConfigRecord(rec)
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=self.node_id,
                        reply_to_message_id="", group_id="scripted", created_at=time.time(), ttl=3600,
                        message_type=message_type)
        msg = Message(content=content, metadata=meta)
        self.sent.append(msg)
        return self.app(msg, self.context)


def reply_values(reply: Message) -> dict[str, Any]:
    """Every scalar the reply carries (metric and config records), flattened, for leak checks."""
    out: dict[str, Any] = {}
    for name, rec in list(reply.content.metric_records.items()) + list(reply.content.config_records.items()):
        for k, v in rec.items():
            out[f"{name}.{k}"] = v
    return out


class InProcessGrid:
    """A stand-in for Flower's Grid that delivers the server's messages to real ClientApps in this process.

    The server code (round loop, aggregators) runs unchanged; ``tamper(message, reply)`` may rewrite or drop
    (return None) a node's reply on its way back, as a faulty node or network would.
    """

    def __init__(self, nodes: dict[int, ScriptedServer], tamper=None) -> None:
        self.nodes, self.tamper, self.log, self.replies = nodes, tamper, [], {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            m.metadata._message_id = uuid.uuid4().hex  # what the SuperLink stamps
            ids.append(m.metadata.message_id)
            node = self.nodes.get(m.metadata.dst_node_id)
            if node is None:
                continue
            reply = node.app(m, node.context)
            self.log.append((m.metadata.message_type, m.metadata.dst_node_id))
            if self.tamper is not None:
                reply = self.tamper(m, reply)
            if reply is not None:
                self.replies[m.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids) -> list:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def task_identity(monkeypatch) -> None:
    """Let server code build messages outside Flower's runtime (it stamps the task's identity on them)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
