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
             arrays: dict[str, np.ndarray] | None = None) -> Message:
        """Deliver one message to the node; returns its reply exactly as it would leave the node."""
        content = RecordDict()
        if config is not None:
            content[record] = ConfigRecord(config)
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
