"""A node's side of secure aggregation: its keys live in Flower's per-node state (as JSON bytes)
and the last round it masked is also kept on its disk, so a restart cannot make it mask a round twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from common import secagg as sa

STATE_KEY = "secagg"


def load_keys(context: Context) -> sa.NodeKeys:
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None or "keys" not in rec:
        raise sa.SecAggError("this node has no secure-aggregation keys for the run",
                             "the server must run the key set-up first (it re-keys automatically)")
    return sa.NodeKeys.loads(bytes(rec["keys"]))


def save_keys(context: Context, keys: sa.NodeKeys) -> None:
    context.state[STATE_KEY] = ConfigRecord({"keys": keys.dumps()})


def _round_file(state_dir: Path, job: str) -> Path:
    return Path(state_dir) / "secagg" / f"{job}.json"


def check_round(keys: sa.NodeKeys, state_dir: Path, job: str, round_: int) -> None:
    """Refuse a round at or below the last one masked (in state or on disk), before any training."""
    keys.check_round(round_)
    f = _round_file(state_dir, job)
    if f.exists():
        last = int(json.loads(f.read_text())["last_round"])
        if round_ <= last:
            raise sa.SecAggError(f"refusing to mask round {round_}: this node's disk says it masked round {last}",
                                 "a round number may be used once per node; the server must move on")


def record_round(state_dir: Path, job: str, round_: int) -> None:
    f = _round_file(state_dir, job)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"last_round": round_}))
    tmp.replace(f)


def advertise(context: Context, *, epoch: int, index: int) -> dict:
    keys = sa.NodeKeys.generate(epoch=epoch, index=index)
    old = context.state.config_records.get(STATE_KEY)
    if old is not None and "keys" in old:  # a new epoch keeps the round high-water mark
        keys.last_round = sa.NodeKeys.loads(bytes(old["keys"])).last_round
    save_keys(context, keys)
    return {"s_pk": keys.s_pk, "c_pk": keys.c_pk}


def join(context: Context, rec: ConfigRecord) -> dict:
    keys = load_keys(context)
    if int(rec["epoch"]) != keys.epoch or int(rec["index"]) != keys.index:
        raise sa.SecAggError("the roster is for another key epoch or index", "the server must re-run the key set-up")
    roster = {int(i): (bytes(a), bytes(b)) for i, a, b in zip(rec["indices"], rec["s_pks"], rec["c_pks"],
                                                               strict=True)}
    sealed = keys.join(roster, [int(v) for v in rec["neighbours"]], int(rec["threshold"]))
    save_keys(context, keys)
    return {"to": list(sealed), "blob": list(sealed.values())}


def mask_update(context: Context, keys: sa.NodeKeys, conf, update: dict[str, np.ndarray],
                node_weight: int) -> tuple[np.ndarray, dict]:
    weight = 1 if str(conf["weighting"]) == "uniform" else min(int(node_weight), int(conf["max-weight"]))
    masked, sealed = keys.mask(int(conf["server-round"]), sa.flatten(update), weight=weight,
                               participants=[int(p) for p in conf["participants"]], clip=float(conf["clip"]),
                               levels_=int(conf["levels"]))
    save_keys(context, keys)
    return masked, {"to": list(sealed), "blob": list(sealed.values())}


def reveal(context: Context, rec: ConfigRecord) -> dict:
    keys = load_keys(context)
    if int(rec["epoch"]) != keys.epoch:
        raise sa.SecAggError("unmask request for another key epoch", "ignored")
    b, s = keys.reveal(int(rec["round"]), uploaded=[int(x) for x in rec["uploaded"]],
                       dropped=[int(x) for x in rec["dropped"]],
                       b_shares=dict(zip([int(x) for x in rec["b_from"]], [bytes(x) for x in rec["b_blob"]],
                                         strict=True)),
                       s_shares=dict(zip([int(x) for x in rec["s_from"]], [bytes(x) for x in rec["s_blob"]],
                                         strict=True)))
    save_keys(context, keys)
    return {"b_from": list(b), "b_share": list(b.values()), "s_from": list(s), "s_share": list(s.values())}
