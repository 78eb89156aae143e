"""A node's side of secure aggregation: every server request is checked against the node's own rules.

The node's secret keys for a key epoch live in Flower's per-node state (JSON bytes, never
pickled). The last round it masked per job and key epoch is also kept on its own disk
(written atomically and fsync'd before the masked upload leaves), so a crash between the
upload and the state update cannot make it mask a round twice under the same keys.
Server-supplied strings never become paths: the job name is hashed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from fedtune.common.operations.atomic import write_json_atomic
from fedtune.common.secagg import codec
from fedtune.common.secagg import protocol as sa
from flwr.app import ConfigRecord, Context

log = logging.getLogger(__name__)

STATE_KEY = "secagg"
_warned: set[str] = set()


def load_keys(context: Context) -> sa.NodeKeys:
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None or "keys" not in rec:
        raise sa.SecAggError("this node has no secure-aggregation keys for the run",
                             "the server must run the key set-up first (it re-keys automatically)")
    return sa.NodeKeys.loads(bytes(rec["keys"]))


def save_keys(context: Context, keys: sa.NodeKeys) -> None:
    context.state[STATE_KEY] = ConfigRecord({"keys": keys.dumps()})


def marker_file(state_dir: Path, job: str) -> Path:
    """Where the node keeps the last round it masked for ``job`` (a hash of the name, never the name)."""
    return Path(state_dir) / "secagg" / f"{hashlib.sha256(job.encode('utf-8')).hexdigest()[:32]}.json"


def _epoch_key(keys: sa.NodeKeys) -> str:
    """Which key epoch a round was masked in: a hash of this node's own mask key for it.

    Masking one round number twice under the same keys would let the server learn the difference of
    the two updates; under new keys (a new epoch, e.g. after a server restart) it is a new masking."""
    return hashlib.sha256(keys.peers[keys.node].s_pk).hexdigest()[:32]


def _markers(state_dir: Path, job: str) -> dict:
    f = marker_file(state_dir, job)
    if not f.exists():
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(f.read_text(encoding="utf-8"))["epochs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise sa.SecAggError(f"the secure-aggregation round record {f} is unreadable",
                             "restore it from backup, or remove it only if this node never masked a round of "
                             "this job") from None


def _params(rec, job: str | None = None) -> sa.Params:
    p = codec.params_from_wire(rec)
    if job is not None and p.job != job:
        raise sa.SecAggError("the secure-aggregation parameters are for another job", "refusing")
    return p


def _check_peers_decided(ns) -> None:
    """A deployed node aggregates only with peers its organization approved (or, knowingly, with anyone)."""
    if ns.partition is not None or ns.roster_path:
        return
    if not ns.any_peer:
        raise sa.SecAggError(
            "this node has no approved peers (node config approved-peers): the server alone would decide whom it "
            "aggregates with, and an operator adding identities of its own could read its update from the sum",
            "list the organizations you accept in approved-peers (a directory of <name>.pub files, or a file of "
            "'<name> <public key>' lines, checked out of band with `fedtune keys fingerprint`), with identity-key; "
            "approved-peers=\"*\" accepts anyone (trials only)")
    if ns.name not in _warned:
        _warned.add(ns.name)
        log.warning("node %s: approved-peers=\"*\": secure-aggregation keys of other nodes are not authenticated and "
                    "the server decides the cohort, so a malicious server could substitute keys or add identities of "
                    "its own; see docs/secure-aggregation.md", ns.name)


def advertise(context: Context, ns, rec) -> dict:
    """Check the proposed key epoch (cohort, graph degree, threshold); make and advertise fresh keys."""
    _check_peers_decided(ns)
    p = _params(rec)
    keys, advert = sa.NodeKeys.generate(p, node=context.node_id, name=ns.name, rules=ns.secagg_rules,
                                        identity=ns.identity_key())
    old = context.state.config_records.get(STATE_KEY)
    if old is not None and "keys" in old:  # a new epoch keeps the round high-water mark
        keys.last_round = sa.NodeKeys.loads(bytes(old["keys"])).last_round
    save_keys(context, keys)
    return codec.advert_to_wire(advert)


def join(context: Context, ns, rec) -> dict:
    keys = load_keys(context)
    _check_peers_decided(ns)
    roster = ns.roster()
    sealed = keys.join(_params(rec, keys.params.job), codec.adverts_from_wire(rec), roster=roster,
                       min_organizations=ns.secagg_rules.min_organizations)
    save_keys(context, keys)
    return codec.shares_to_wire(sealed)


def check_train(context: Context, ns, job: str, rec) -> tuple[sa.NodeKeys, sa.Params]:
    """Refuse, before any training (and any privacy spend), a round this node must not mask."""
    keys = load_keys(context)
    p = _params(rec, job)
    keys.check_round(p, ns.secagg_rules)
    last = _markers(ns.state_dir, job).get(_epoch_key(keys), 0)
    if p.round <= last:
        raise sa.SecAggError(f"refusing to mask round {p.round}: this node's disk says it masked round {last} "
                             "under these keys", "a round number may be used once per key epoch; the server must "
                             "move on (or start a new key epoch)")
    return keys, p


def mask(context: Context, ns, keys: sa.NodeKeys, p: sa.Params, update: dict[str, np.ndarray],
         weight: int) -> tuple[np.ndarray, dict]:
    flat = sa.flatten(update)
    clipped = int(np.count_nonzero(np.abs(flat) > p.clip))
    if clipped:  # said here, on the node, only: a count derived from the update never leaves it in the clear
        log.warning("node %s, round %d: %d of %d update values exceed the secure-aggregation clip %g and are cut to "
                    "it (the aggregate is biased); raise fed.secagg-clip (nodes accept up to %g)", ns.name, p.round,
                    clipped, flat.size, p.clip, ns.secagg_rules.clip[1])
    out = keys.mask(p, flat, weight=weight, rules=ns.secagg_rules)
    save_keys(context, keys)
    epochs = _markers(ns.state_dir, p.job)
    epochs[_epoch_key(keys)] = p.round
    write_json_atomic(marker_file(ns.state_dir, p.job), {"job": p.job, "epochs": epochs})  # before the upload leaves
    return out["masked"], codec.upload_to_wire(out["shares"], out["commit"], out["sig"])


def consistency(context: Context, ns, rec) -> dict:
    keys = load_keys(context)
    p = _params(rec, keys.params.job)
    sig = keys.consistency(p.round, codec.survivors_from_wire(rec))
    save_keys(context, keys)
    return codec.signature_to_wire(sig)


def reveal(context: Context, ns, rec) -> dict:
    keys = load_keys(context)
    p = _params(rec, keys.params.job)
    req = codec.unmask_request_from_wire(rec)
    if keys.round_params is None or p.digest() != keys.round_params.digest():
        raise sa.SecAggError("the unmask request's parameters are not the ones this node masked with",
                             "stale or altered request; refusing")
    b, s = keys.reveal(p.round, uploaded=req.uploaded, signatures=req.sigs, survivor_signatures=req.survivor_sigs,
                       b_shares=req.b_shares, s_shares=req.s_shares, rules=ns.secagg_rules)
    save_keys(context, keys)
    return codec.reveal_to_wire(b, s)
