"""The envelope: every message fedtune's server and nodes exchange, its type and its records.

The one place a message type or a record name is spelled, and the one place messages are built and
opened, for both sides: the ServerApp (``server/``) builds requests and opens replies with it, the
ClientApp (``client/``) opens requests and builds replies. What is *inside* a record (the keys of an
instruction, a result, an evaluation answer) is spelled by the typed values of
``fedtune.common.training.wire`` and ``fedtune.common.secagg.codec``; this module only puts them in
and takes them out of Flower's records. Nothing from the network is trusted here: a missing record is
``None`` (or a refusal where the node must act on it), arrays that do not decode are refused.

| message type | server sends | node replies |
| --- | --- | --- |
| ``train`` | arrays, config (a ``RoundTask``), secagg (round parameters, secure only) | info; plain: update + metrics; secure: masked + metrics + secagg (upload) |
| ``evaluate`` | arrays, config | info, metrics (an ``EvalAnswer``) |
| ``query.info`` | nothing | info (the node's name: configuration only) |
| ``query.secagg_keys`` / ``_join`` / ``_consistency`` / ``_unmask`` | secagg | info, secagg |
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from fedtune.common.errors import UnsafeMessage
from fedtune.common.training.wire import NodeInfo, RoundTask
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# -- message types (the server's names; a node registers a query under the part after "query.") ----------------
TRAIN = "train"
EVALUATE = "evaluate"
INFO = "query.info"
SECAGG_KEYS = "query.secagg_keys"
SECAGG_JOIN = "query.secagg_join"
SECAGG_CONSISTENCY = "query.secagg_consistency"
SECAGG_UNMASK = "query.secagg_unmask"
SECAGG_QUERIES = (SECAGG_KEYS, SECAGG_JOIN, SECAGG_CONSISTENCY, SECAGG_UNMASK)

# -- record names --------------------------------------------------------------------------------------------
ARRAYS = "arrays"  # the global adapter tensors a request carries
CONFIG = "config"  # the instruction (RoundTask.to_record)
SECAGG = "secagg"  # secure-aggregation values (codec), both ways
INFO_RECORD = "info"  # a reply's NodeInfo
UPDATE = "update"  # a plain reply's update tensors
MASKED = "masked"  # a secure reply's masked vector (one array of that name)
METRICS = "metrics"  # a reply's figures (NodeRoundResult / EvalAnswer records)


def query_action(message_type: str) -> str:
    """The name a node's ``@app.query(...)`` handler is registered under for ``message_type``."""
    kind, _, action = message_type.partition(".")
    if kind != "query" or not action:
        raise ValueError(f"{message_type!r} is not a query message type")  # a bug, not a user error
    return action


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def config_record(values: Mapping) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


# -- server -> node ------------------------------------------------------------------------------------------

def request(*, arrays: ArrayRecord | Mapping[str, np.ndarray] | None = None, task: Mapping | None = None,
            secagg: Mapping | None = None) -> RecordDict:
    """A request's content: the adapter tensors, the instruction record and secure-aggregation values, each
    only when given (``task``: ``RoundTask.to_record()`` plus the run's settings a node reads)."""
    content: dict = {}
    if arrays is not None:
        content[ARRAYS] = arrays if isinstance(arrays, ArrayRecord) else array_record(arrays)
    if task is not None:
        content[CONFIG] = config_record(task)
    if secagg is not None:
        content[SECAGG] = config_record(secagg)
    return RecordDict(content)


def received_arrays(content: RecordDict) -> dict[str, np.ndarray]:
    """The server's adapter tensors (a request without them, or whose bytes do not decode, is refused)."""
    rec = content.array_records.get(ARRAYS)
    if rec is None:
        raise UnsafeMessage(f"the server's message carries no adapter ({ARRAYS!r} record)", "refusing")
    try:
        return {str(k): np.asarray(a.numpy()) for k, a in rec.items()}
    except Exception as e:  # noqa: BLE001  (bytes from the network that do not decode: refused, never a crash)
        raise UnsafeMessage(f"the server's adapter does not decode ({e.__class__.__name__})", "refusing") from None


def received_task(content: RecordDict) -> RoundTask:
    rec = content.config_records.get(CONFIG)
    if rec is None:
        raise UnsafeMessage(f"the server's message carries no instruction ({CONFIG!r} record)", "refusing")
    return RoundTask.from_record(rec)


def secagg_record(content: RecordDict | None) -> ConfigRecord | None:
    """The secure-aggregation record of a request or a reply, or None."""
    return None if content is None else content.config_records.get(SECAGG)


# -- node -> server ------------------------------------------------------------------------------------------

def reply(info: NodeInfo, *, result: Mapping | None = None, masked: np.ndarray | None = None,
          secagg: Mapping | None = None) -> RecordDict:
    """A reply's content: the node's status line, and what its result's ``to_record()`` holds (``update``
    tensors and/or ``metrics``), the masked vector and secure-aggregation values when given."""
    content: dict = {INFO_RECORD: ConfigRecord(info.to_record())}
    update = (result or {}).get(UPDATE)
    if masked is not None and (update is not None or "weight" in ((result or {}).get(METRICS) or {})):
        # a bug, never a reply: under secure aggregation the update and the weight leave only masked
        raise ValueError("a masked reply may not carry the update or the weight in the clear")
    if update is not None:
        content[UPDATE] = array_record(update)
    if masked is not None:
        content[MASKED] = array_record({MASKED: masked})
    if result and result.get(METRICS) is not None:
        content[METRICS] = MetricRecord(result[METRICS])
    if secagg is not None:
        content[SECAGG] = ConfigRecord(dict(secagg))
    return RecordDict(content)


def reply_info(content: RecordDict, default_name: str) -> NodeInfo:
    return NodeInfo.from_record(content.config_records.get(INFO_RECORD) or ConfigRecord({}), default_name)


def reply_metrics(content: RecordDict) -> dict:
    """Every figure of a reply (non-finite numbers become None: no figure)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for rec in content.metric_records.values() for k, v in rec.items()}


def reply_update(content: RecordDict | None) -> dict[str, np.ndarray] | None:
    """A plain reply's update tensors, or None when it carries none."""
    rec = None if content is None else content.array_records.get(UPDATE)
    return None if rec is None else {k: a.numpy() for k, a in rec.items()}


def reply_masked(content: RecordDict) -> np.ndarray:
    """A secure reply's masked vector (KeyError when it carries none)."""
    return content.array_records[MASKED][MASKED].numpy()


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays and byte strings (what the monitoring counts)."""
    return sum(a.count_bytes() for a in content.array_records.values()) + sum(
        len(b) for rec in content.config_records.values() for v in rec.values()
        for b in (v if isinstance(v, list) else [v]) if isinstance(b, bytes))
