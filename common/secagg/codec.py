"""The secure-aggregation message layout: the only place its field names are spelled.

Both sides encode and decode here; a decoder raises :class:`SecAggError` on anything malformed, so a
node refuses a bad request (and the server fails a bad reply) with one message. Values are plain
Python (strings, ints, floats, bytes and lists of them); the Flower glue puts them in ConfigRecords.
Node ids are unsigned 64-bit and travel as decimal strings.

One exchange per step of :mod:`fedtune.common.secagg.protocol`:

====================  ===============================  =================================
step                  server -> node                   node -> server
====================  ===============================  =================================
keys                  ``params_to_wire``               ``advert_to_wire``
join                  ``join_request``                 ``shares_to_wire``
train                 ``params_to_wire``               ``upload_to_wire`` (+ the masked vector)
consistency           ``consistency_request``          ``signature_to_wire``
unmask                ``unmask_request``               ``reveal_to_wire``
====================  ===============================  =================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from fedtune.common.errors import SecAggError
from fedtune.common.secagg.protocol import Advert, Params, Upload


def _bytes(rec: Mapping, key: str) -> bytes:
    v = rec.get(key)
    if not isinstance(v, bytes):
        raise SecAggError(f"a secure-aggregation message lacks its {key!r} field", "refusing")
    return v


# -- parameters (every request carries them) -----------------------------------------------------
def params_to_wire(p: Params) -> dict:
    d = asdict(p)
    d["cohort"] = ids_to_wire(p.cohort)
    return {f"p-{k}": v for k, v in d.items()}


def params_from_wire(rec: Mapping) -> Params:
    try:
        return Params(job=str(rec["p-job"]), epoch=int(rec["p-epoch"]),
                      cohort=tuple(sorted(int(v) for v in rec["p-cohort"])), seed=int(rec["p-seed"]),
                      degree=int(rec["p-degree"]), threshold=int(rec["p-threshold"]), round=int(rec["p-round"]),
                      clip=float(rec["p-clip"]), max_weight=int(rec["p-max_weight"]),
                      weighting=str(rec["p-weighting"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SecAggError(f"malformed secure-aggregation parameters ({e.__class__.__name__}: {e})",
                          "the server sent an invalid message; refusing") from None


# -- join: the cohort's keys out, each node's sealed key shares back ---------------------------------
def join_request(p: Params, adverts: Mapping[int, Advert]) -> dict:
    return {**params_to_wire(p), **adverts_to_wire(adverts)}


def shares_to_wire(sealed: Mapping[int, bytes]) -> dict:
    return map_to_wire("shares", sealed)


def shares_from_wire(rec: Mapping) -> dict[int, bytes]:
    return map_from_wire(rec, "shares")


# -- train: the masked upload's companions -----------------------------------------------------------
def upload_to_wire(shares: Mapping[int, bytes], commit: bytes, sig: bytes) -> dict:
    return {**shares_to_wire(shares), "commit": commit, "sig": sig}


def upload_from_wire(rec: Mapping, masked: np.ndarray) -> Upload:
    return Upload(masked=masked, shares=shares_from_wire(rec), commit=_bytes(rec, "commit"), sig=_bytes(rec, "sig"))


# -- consistency: the survivor set, each survivor's signature on it ----------------------------------
def consistency_request(p: Params, survivors: Iterable[int]) -> dict:
    return {**params_to_wire(p), "survivors": ids_to_wire(survivors)}


def survivors_from_wire(rec: Mapping) -> list[int]:
    return ids_from_wire(rec.get("survivors", []))


def signature_to_wire(sig: bytes) -> dict:
    return {"sig": sig}


def signature_from_wire(rec: Mapping) -> bytes:
    return _bytes(rec, "sig")


# -- unmask: what the server asks a survivor to reveal, and the reveal -------------------------------
@dataclass(frozen=True)
class UnmaskRequest:
    params: Params
    uploaded: list[int]
    sigs: dict[int, bytes]
    survivor_sigs: dict[int, bytes]
    b_shares: dict[int, bytes]
    s_shares: dict[int, bytes]


def unmask_request(r: UnmaskRequest) -> dict:
    return {**params_to_wire(r.params), "uploaded": ids_to_wire(r.uploaded), **map_to_wire("sigs", r.sigs),
            **map_to_wire("survivor-sigs", r.survivor_sigs), **map_to_wire("b", r.b_shares),
            **map_to_wire("s", r.s_shares)}


def unmask_request_from_wire(rec: Mapping) -> UnmaskRequest:
    return UnmaskRequest(params=params_from_wire(rec), uploaded=ids_from_wire(rec.get("uploaded", [])),
                         sigs=map_from_wire(rec, "sigs"), survivor_sigs=map_from_wire(rec, "survivor-sigs"),
                         b_shares=map_from_wire(rec, "b"), s_shares=map_from_wire(rec, "s"))


def reveal_to_wire(b: Mapping[int, bytes], s: Mapping[int, bytes]) -> dict:
    return {**map_to_wire("b", b), **map_to_wire("s", s)}


def reveal_from_wire(rec: Mapping) -> tuple[dict[int, bytes], dict[int, bytes]]:
    return map_from_wire(rec, "b"), map_from_wire(rec, "s")


# -- building blocks ---------------------------------------------------------------------------------
def ids_to_wire(ids: Iterable[int]) -> list[str]:
    """Node ids are unsigned 64-bit: they travel as decimal strings."""
    return [str(int(v)) for v in ids]


def ids_from_wire(values) -> list[int]:
    try:
        return [int(str(v)) for v in values]
    except (TypeError, ValueError):
        raise SecAggError("malformed node ids in a secure-aggregation message", "refusing") from None


def map_to_wire(prefix: str, items: Mapping[int, bytes]) -> dict:
    return {f"{prefix}-ids": ids_to_wire(items), f"{prefix}-blobs": [bytes(b) for b in items.values()]}


def map_from_wire(rec: Mapping, prefix: str) -> dict[int, bytes]:
    ids, blobs = rec.get(f"{prefix}-ids", []), rec.get(f"{prefix}-blobs", [])
    if not isinstance(ids, list) or not isinstance(blobs, list) or len(ids) != len(blobs) or \
            not all(isinstance(b, bytes) for b in blobs):
        raise SecAggError(f"malformed {prefix!r} entries in a secure-aggregation message", "refusing")
    out = dict(zip(ids_from_wire(ids), blobs, strict=True))
    if len(out) != len(ids):
        raise SecAggError(f"repeated node ids in {prefix!r}", "refusing")
    return out


def adverts_to_wire(adverts: Mapping[int, Advert]) -> dict:
    a = list(adverts.values())
    return {"adv-node": ids_to_wire(x.node for x in a), "adv-name": [x.name for x in a],
            "adv-s": [x.s_pk for x in a], "adv-c": [x.c_pk for x in a], "adv-g": [x.sign_pk for x in a],
            "adv-sig": [x.identity_sig for x in a]}


def adverts_from_wire(rec: Mapping) -> dict[int, Advert]:
    try:
        cols = [rec[k] for k in ("adv-node", "adv-name", "adv-s", "adv-c", "adv-g", "adv-sig")]
        if len({len(c) for c in cols}) != 1:
            raise ValueError("columns of different lengths")
        out = {}
        for node, name, s, c, g, sig in zip(ids_from_wire(cols[0]), *cols[1:], strict=True):
            if not all(isinstance(x, bytes) for x in (s, c, g, sig)) or len(s) != 32 or len(c) != 32 or len(g) != 32:
                raise ValueError("malformed key")
            out[node] = Advert(node=node, name=str(name), s_pk=s, c_pk=c, sign_pk=g, identity_sig=sig)
    except (KeyError, TypeError, ValueError) as e:
        raise SecAggError(f"malformed public keys in a secure-aggregation message ({e})", "refusing") from None
    if len(out) != len(cols[0]):
        raise SecAggError("a node appears twice among the public keys", "refusing")
    return out


def advert_to_wire(a: Advert) -> dict:
    return {"a-node": str(a.node), "a-name": a.name, "a-s": a.s_pk, "a-c": a.c_pk, "a-g": a.sign_pk,
            "a-sig": a.identity_sig}


def advert_from_wire(rec: Mapping) -> Advert:
    return adverts_from_wire({"adv-node": [rec.get("a-node")], "adv-name": [rec.get("a-name")],
                              "adv-s": [rec.get("a-s")], "adv-c": [rec.get("a-c")], "adv-g": [rec.get("a-g")],
                              "adv-sig": [rec.get("a-sig")]})[int(str(rec.get("a-node")))]
