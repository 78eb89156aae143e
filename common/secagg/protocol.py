"""Secure aggregation (SecAgg / SecAgg+, multi-round as in Flamingo): the pure protocol, no Flower.

The server proposes, every node verifies. The server proposes a round's parameters
(:class:`Params`: the cohort, the neighbour-graph seed and degree, the Shamir threshold,
clipping, weights); each node checks them against bounds its organization set
(:class:`NodeRules`), computes its own neighbours from the public seed and the sorted
cohort, and signs the parameters it saw, so that a server telling nodes different things is
caught before any secret is revealed.

Primitives are composed, never written here: X25519 key agreement, HKDF-SHA256, AES-GCM,
the ChaCha20 stream cipher, Ed25519 and ECDSA signatures and SHA-256 from ``cryptography``;
Shamir secret sharing over GF(2^128) from ``pycryptodome``.

**Key epoch** (among one cohort): every node makes X25519 key pairs ``s`` (pairwise mask
seeds) and ``c`` (share encryption) and an Ed25519 signing key, advertises the public keys
(signed with its long-term identity key when the organization configured one), and
Shamir-shares ``s`` t-of-k with its neighbours, encrypted for each. An epoch lasts while the
cohort is unchanged and no node's mask key was revealed.

**Round r**: a node quantizes its update to Z_(2^32) (clip, unbiased stochastic rounding),
multiplies by its integer weight, appends the weight, and adds a fresh self mask PRG(b_u,r)
and, for every neighbour v, +PRG(s_uv, r) if u < v else -PRG(s_uv, r). It uploads the
uint32 vector with t-of-k shares of b_u sealed for its neighbours, a commitment to b_u and a
signature over the round's parameters. To unmask, survivors reveal b-shares of nodes that
uploaded and s-shares of nodes that dropped, after checking the others' signatures.

Rules every node enforces (whatever the server asks): threshold t > k/2 and at least its
minimum; cohort at least its minimum; parameters within its bounds; one survivor set per
round (and, when nodes dropped, signatures of every survivor over that set); never both
shares of a peer in an epoch; no further round in an epoch once it revealed a mask key;
each round number masked once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fedtune.common.errors import ParamsError, SecAggError
from fedtune.common.secagg.limits import (
    CLIP_RANGE,
    MAX_WEIGHT,
    MIN_COHORT,
    MIN_ORGANIZATIONS,
    MIN_THRESHOLD,
    MOD_BITS,
    WEIGHTINGS,
    effective_max_weight,
    levels,
    node_weight,
)

MOD = 1 << MOD_BITS
MAX_COMBINATIONS = 64  # share subsets tried when a reconstructed secret fails its check


# -- primitives, composed ----------------------------------------------------------------------
def _raw(pk: X25519PublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedtune-secagg|" + info).derive(secret)


def agree(sk: bytes, peer_pk: bytes, info: bytes) -> bytes:
    """A 256-bit key from X25519(sk, peer_pk) through HKDF, bound to ``info``."""
    try:
        shared = X25519PrivateKey.from_private_bytes(sk).exchange(X25519PublicKey.from_public_bytes(peer_pk))
    except ValueError:
        raise SecAggError("a peer's public key is not a valid X25519 key", "discard that peer's keys") from None
    return _kdf(shared, info)


def prg(seed: bytes, round_: int, length: int) -> np.ndarray:
    """``length`` uint32 words of the ChaCha20 keystream under a per-round key derived from ``seed``."""
    key = _kdf(seed, b"mask|" + struct.pack(">Q", round_))
    enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (4 * length)), dtype="<u4").astype(np.uint32)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except (InvalidTag, ValueError):
        raise SecAggError("a secret share failed authentication (tampered, replayed, or sent to the wrong node)",
                          "the server or the network altered protocol messages; the round must be discarded") from None


def share_secret(secret: bytes, t: int, n: int) -> list[bytes]:
    """Shamir t-of-n shares of a 32-byte secret (two GF(2^128) halves); share i is for holder i+1."""
    from Crypto.Protocol.SecretSharing import Shamir

    lo = Shamir.split(t, n, secret[:16], ssss=False)
    hi = Shamir.split(t, n, secret[16:], ssss=False)
    return [struct.pack(">H", i) + a + b for (i, a), (_, b) in zip(lo, hi, strict=True)]


def combine_secret(shares: Sequence[bytes]) -> bytes:
    from Crypto.Protocol.SecretSharing import Shamir

    if any(len(s) != 34 for s in shares) or len({s[:2] for s in shares}) != len(shares):
        raise SecAggError("malformed or repeated secret shares", "the round must be discarded")
    lo = [(struct.unpack(">H", s[:2])[0], s[2:18]) for s in shares]
    hi = [(struct.unpack(">H", s[:2])[0], s[18:34]) for s in shares]
    return Shamir.combine(lo, ssss=False) + Shamir.combine(hi, ssss=False)


def commitment(b: bytes, *, job: str, epoch: int, round_: int, node: int) -> bytes:
    """SHA-256 commitment to a self-mask seed (binding; hiding since b is 256 random bits)."""
    return hashlib.sha256(f"fedtune-secagg-b|{job}|{epoch}|{round_}|{node}|".encode() + b).digest()


# -- identities: long-term keys (the SuperNode authentication keys) ------------------------------
def load_identity_key(path: str):
    """A node's long-term private key: the OpenSSH key its SuperNode authenticates with."""
    try:
        with open(path, "rb") as f:
            key = serialization.load_ssh_private_key(f.read(), password=None)
    except (OSError, ValueError) as e:
        raise SecAggError(f"cannot read the identity key {path} ({e.__class__.__name__}: {e})",
                          "point node config identity-key at this node's private key (fedtune keys node)") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise SecAggError(f"identity key {path} is not an ECDSA or Ed25519 key", "use a key made by fedtune keys")
    return key


def organization(name: str) -> str:
    """The organization a node name belongs to: the part before ``/`` (``hospital-b/site-2``), or the name."""
    return name.split("/", 1)[0]


def fingerprint(public_key) -> str:
    """The OpenSSH fingerprint of a public key (``SHA256:...``, as ``ssh-keygen -lf`` prints it), to compare keys
    read aloud or sent out of band."""
    import base64

    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()
    digest = hashlib.sha256(base64.b64decode(line[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_roster(path: str) -> dict[str, object]:
    """An organization's approved peers' public keys, by node name: a directory of ``<name>.pub`` files
    (as ``fedtune keys`` writes them) or one file of ``<name> <openssh public key>`` lines. A node name
    ``org/site`` in a file groups nodes of one organization (a file name cannot hold ``/``: use ``org--site.pub``)."""
    from pathlib import Path

    p = Path(path)
    entries: dict[str, bytes] = {}
    try:
        if p.is_dir():
            for f in sorted(p.glob("*.pub")):
                entries[f.stem.replace("--", "/", 1)] = f.read_bytes().strip()
        else:
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    name, _, key = line.strip().partition(" ")
                    if not key:
                        raise ValueError(f"line {n}: expected '<name> <public key>'")
                    entries[name] = key.strip().encode()
        roster = {name: serialization.load_ssh_public_key(key) for name, key in entries.items()}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SecAggError(f"cannot read the federation roster {path} ({e})",
                          "point node config roster at the directory of registered <name>.pub files the operator "
                          "distributed") from None
    if not roster:
        raise SecAggError(f"the federation roster {path} holds no public keys", "ask the operator for the roster")
    return roster


def _sign_identity(key, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA384()))
    return key.sign(data)


def _verify_identity(public_key, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA384()))
        else:
            public_key.verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _verify_ed25519(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- the update as one vector ---------------------------------------------------------------------
def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Exchanged tensors as one float32 vector, in sorted-name order (the same on every node and the server)."""
    return np.concatenate([np.asarray(arrays[k], np.float32).ravel() for k in sorted(arrays)])


def unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].size
        out[k] = vec[i:i + n].reshape(like[k].shape)
        i += n
    return out


# -- quantization ----------------------------------------------------------------------------
def quantize(x: np.ndarray, *, clip: float, levels_: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip], scale to [-L, L] and round stochastically (unbiased); int64 result."""
    scaled = np.clip(np.asarray(x, np.float64), -clip, clip) / clip * levels_
    low = np.floor(scaled)
    return (low + (rng.random(scaled.shape) < (scaled - low))).astype(np.int64)


def dequantize_sum(total: np.ndarray, *, clip: float, levels_: int) -> np.ndarray:
    """A sum in Z_(2^32) back to floats (read as signed 32-bit)."""
    signed = total.astype(np.uint32).view(np.int32).astype(np.float64)
    return signed / levels_ * clip


# -- the neighbour graph -----------------------------------------------------------------------
def effective_degree(n: int, degree: int) -> int:
    """The degree the graph really has: n-1 (complete) when asked for as much, else the even degree below."""
    return n - 1 if degree >= n - 1 else 2 * (degree // 2)


def neighbour_graph(nodes: Sequence[int], *, degree: int, seed: int) -> dict[int, list[int]]:
    """A k-regular circulant graph over a seeded permutation of the sorted nodes; complete when degree >= n-1.

    Every node computes it itself from the public seed and the cohort."""
    nodes = sorted(nodes)
    n = len(nodes)
    if degree >= n - 1:
        return {u: [v for v in nodes if v != u] for u in nodes}
    order = nodes[:]
    random.Random(seed).shuffle(order)
    out: dict[int, set[int]] = {u: set() for u in nodes}
    for i, u in enumerate(order):
        for d in range(1, degree // 2 + 1):
            v = order[(i + d) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: sorted(vs) for u, vs in out.items()}


def default_degree(n: int) -> int:
    """SecAgg+ neighbourhood size: O(log n), even, at least 4 (complete graph for small n)."""
    k = 2 * math.ceil(1.5 * math.log2(max(n, 2)))
    return n - 1 if n <= k + 1 else k


def threshold(n_neighbours: int, fraction: float) -> int:
    """Shamir threshold for k neighbours: floor(fraction x k) + 1, and always a strict majority of k."""
    return min(n_neighbours, max(n_neighbours // 2 + 1, math.floor(fraction * n_neighbours) + 1))


def connected(nodes: Iterable[int], graph: Mapping[int, Sequence[int]]) -> bool:
    """Whether ``nodes`` induce a connected subgraph (else the server could unmask each part's sum)."""
    nodes = set(nodes)
    if not nodes:
        return False
    seen, stack = set(), [min(nodes)]
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        stack.extend(v for v in graph.get(u, ()) if v in nodes and v not in seen)
    return seen == nodes


# -- parameters: proposed by the server, checked and signed by every node ---------------------------
@dataclass(frozen=True)
class Params:
    """A round's secure-aggregation parameters (the key epoch's, plus the round's own)."""

    job: str
    epoch: int
    cohort: tuple[int, ...]  # sorted node ids taking part in the epoch
    seed: int  # seed of the neighbour graph: derived from every advertised key (0 while keys are collected)
    degree: int
    threshold: int
    round: int = 0
    clip: float = 1.0
    max_weight: int = 1
    weighting: str = "weighted"

    @property
    def graph(self) -> dict[int, list[int]]:
        return neighbour_graph(self.cohort, degree=self.degree, seed=self.seed)

    @property
    def levels(self) -> int:
        return levels(n_nodes=len(self.cohort), max_weight=self.max_weight)

    def epoch_part(self) -> tuple:
        return (self.job, self.epoch, self.cohort, self.seed, self.degree, self.threshold)

    def digest(self) -> bytes:
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"fedtune-secagg-params|" + blob).digest()


@dataclass(frozen=True)
class NodeRules:
    """Bounds a node's organization sets on what the server may propose."""

    min_cohort: int = MIN_COHORT
    min_threshold: int = MIN_THRESHOLD
    max_weight: int = MAX_WEIGHT
    clip: tuple[float, float] = CLIP_RANGE
    min_organizations: int = MIN_ORGANIZATIONS  # distinct approved organizations (this one included) a cohort must hold

    def check_epoch(self, p: Params, me: int) -> None:
        """Raise ParamsError unless the key epoch's cohort, graph and threshold are safe for node ``me``."""
        self._raise(self._epoch_problems(p, me))

    def check(self, p: Params, me: int) -> None:
        """Raise ParamsError unless a round's parameters are all safe for node ``me`` by these rules."""
        problems = self._epoch_problems(p, me)
        if p.weighting not in WEIGHTINGS:
            problems.append(f"unknown weighting {p.weighting!r}")
        if not 1 <= p.max_weight <= self.max_weight or p.max_weight != effective_max_weight(p.weighting, p.max_weight):
            problems.append(f"max-weight {p.max_weight} is outside 1..{self.max_weight} (1 for uniform weighting)")
        if not (math.isfinite(p.clip) and self.clip[0] <= p.clip <= self.clip[1]):
            problems.append(f"clip {p.clip} is outside {self.clip[0]:g}..{self.clip[1]:g}")
        if not problems:
            try:
                p.levels
            except SecAggError as e:
                problems.append(e.problem)
        self._raise(problems)

    def _epoch_problems(self, p: Params, me: int) -> list[str]:
        problems = []
        n = len(p.cohort)
        if me not in p.cohort:
            problems.append("this node is not in the proposed cohort")
        if len(set(p.cohort)) != n:
            problems.append("the cohort repeats a node")
        if n < self.min_cohort:
            problems.append(f"a cohort of {n} nodes is below this node's minimum of {self.min_cohort}")
        k = effective_degree(n, p.degree)
        if k < 2:
            problems.append(f"neighbour degree {p.degree} gives {k} neighbours; at least 2 are needed")
        elif not k // 2 < p.threshold <= k:
            problems.append(f"threshold {p.threshold} is not a strict majority of the {k} neighbours "
                            f"(it must be {k // 2 + 1}..{k})")
        if p.threshold < self.min_threshold:
            problems.append(f"threshold {p.threshold} is below this node's minimum of {self.min_threshold}")
        return problems

    @staticmethod
    def _raise(problems: list[str]) -> None:
        if problems:
            raise ParamsError("refusing secure-aggregation parameters: " + "; ".join(problems),
                              "the server must propose parameters within this node's rules (node config secagg-*)")


def _msg(kind: str, p: Params, extra: bytes = b"") -> bytes:
    return b"fedtune-secagg|" + kind.encode() + b"|" + p.digest() + b"|" + extra


def _survivors_bytes(survivors: Sequence[int]) -> bytes:
    return ",".join(str(v) for v in sorted(survivors)).encode()


@dataclass(frozen=True)
class Advert:
    """A node's public keys for one epoch, signed with its identity key when it has one."""

    node: int
    name: str
    s_pk: bytes
    c_pk: bytes
    sign_pk: bytes
    identity_sig: bytes = b""

    def signed_bytes(self, job: str, epoch: int) -> bytes:
        return b"|".join([b"fedtune-secagg-advert", job.encode(), str(epoch).encode(), str(self.node).encode(),
                          self.name.encode(), self.s_pk, self.c_pk, self.sign_pk])


def graph_seed(job: str, epoch: int, adverts: Mapping[int, Advert]) -> int:
    """The neighbour graph's seed: a hash of every advertised key, so the server alone cannot choose it."""
    h = hashlib.sha256(f"fedtune-secagg-graph|{job}|{epoch}".encode())
    for v in sorted(adverts):
        a = adverts[v]
        h.update(str(v).encode() + b"|" + a.s_pk + a.c_pk + a.sign_pk)
    return int.from_bytes(h.digest()[:8], "big") & 0x7FFFFFFFFFFFFFFF


def _aad(p: Params, round_: int, sender: int, receiver: int, kind: str) -> bytes:
    return f"{p.job}|{p.epoch}|{round_}|{sender}|{receiver}|{kind}".encode()


# -- the node's side -----------------------------------------------------------------------------
@dataclass
class NodeKeys:
    """A node's secret state for one key epoch (kept on the node only, never pickled)."""

    node: int
    name: str
    params: Params  # the epoch's parameters as this node accepted them
    s_sk: bytes
    c_sk: bytes
    sign_sk: bytes
    peers: dict[int, Advert] = field(default_factory=dict)
    neighbours: list[int] = field(default_factory=list)
    last_round: int = 0  # the last round this node masked an update for: never mask again at or below it
    round_params: Params | None = None  # the parameters of the last round it masked
    committed: dict[int, list[int]] = field(default_factory=dict)  # round -> the survivor set this node accepted
    revealed_b: dict[int, list[int]] = field(default_factory=dict)  # round -> peers whose b-share it revealed
    revealed_s: list[int] = field(default_factory=list)  # peers whose mask-key share it revealed (this epoch)

    @classmethod
    def generate(cls, params: Params, *, node: int, name: str, rules: NodeRules, identity=None) -> tuple[
            NodeKeys, Advert]:
        """Check the proposed epoch, make fresh keys, and return them with the signed advertisement."""
        rules.check_epoch(params, node)
        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        s, c, g = X25519PrivateKey.generate(), X25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        keys = cls(node=node, name=name, params=params, s_sk=s.private_bytes(*raw), c_sk=c.private_bytes(*raw),
                   sign_sk=g.private_bytes(*raw))
        advert = Advert(node=node, name=name, s_pk=_raw(s.public_key()), c_pk=_raw(c.public_key()),
                        sign_pk=_raw(g.public_key()))
        if identity is not None:
            advert = Advert(**{**asdict(advert),
                               "identity_sig": _sign_identity(identity, advert.signed_bytes(params.job, params.epoch))})
        keys.peers[node] = advert
        return keys, advert

    # persistence in the node's own state store (JSON, never pickle)
    def dumps(self) -> bytes:
        d = asdict(self)
        for k in ("s_sk", "c_sk", "sign_sk"):
            d[k] = d[k].hex()
        d["peers"] = {str(i): {**asdict(a), "s_pk": a.s_pk.hex(), "c_pk": a.c_pk.hex(), "sign_pk": a.sign_pk.hex(),
                               "identity_sig": a.identity_sig.hex()} for i, a in self.peers.items()}
        d["committed"] = {str(r): v for r, v in self.committed.items()}
        d["revealed_b"] = {str(r): v for r, v in self.revealed_b.items()}
        return json.dumps(d).encode()

    @classmethod
    def loads(cls, raw: bytes) -> NodeKeys:
        d = json.loads(raw)

        def params(x):
            return None if x is None else Params(**{**x, "cohort": tuple(x["cohort"])})

        return cls(node=int(d["node"]), name=d["name"], params=params(d["params"]), s_sk=bytes.fromhex(d["s_sk"]),
                   c_sk=bytes.fromhex(d["c_sk"]), sign_sk=bytes.fromhex(d["sign_sk"]),
                   peers={int(i): Advert(node=int(a["node"]), name=a["name"], s_pk=bytes.fromhex(a["s_pk"]),
                                         c_pk=bytes.fromhex(a["c_pk"]), sign_pk=bytes.fromhex(a["sign_pk"]),
                                         identity_sig=bytes.fromhex(a["identity_sig"]))
                          for i, a in d["peers"].items()},
                   neighbours=[int(v) for v in d["neighbours"]], last_round=int(d["last_round"]),
                   round_params=params(d["round_params"]),
                   committed={int(r): [int(v) for v in s] for r, s in d["committed"].items()},
                   revealed_b={int(r): [int(v) for v in s] for r, s in d["revealed_b"].items()},
                   revealed_s=[int(v) for v in d["revealed_s"]])

    def _sign(self, data: bytes) -> bytes:
        return ed25519.Ed25519PrivateKey.from_private_bytes(self.sign_sk).sign(data)

    def _share_key(self, peer: int) -> bytes:
        a, b = sorted((self.node, peer))
        return agree(self.c_sk, self.peers[peer].c_pk, f"share|{self.params.job}|{self.params.epoch}|{a}|{b}".encode())

    def _mask_seed(self, peer: int) -> bytes:
        a, b = sorted((self.node, peer))
        return agree(self.s_sk, self.peers[peer].s_pk, f"pair|{self.params.job}|{self.params.epoch}|{a}|{b}".encode())

    def join(self, params: Params, adverts: Mapping[int, Advert], *, roster: Mapping[str, object] | None,
             min_organizations: int = 1) -> dict[int, bytes]:
        """Accept the epoch's public keys; return this node's mask-key shares, sealed for each neighbour.

        Checks: the same epoch parameters as advertised for, one advertisement per cohort member, this
        node's own keys unchanged, no repeated key, and (with a roster: the peers this node's organization
        approved) every advertisement signed by the identity key approved under its name, from at least
        ``min_organizations`` distinct organizations (this node's included).
        """
        if dataclasses.replace(params, seed=0).epoch_part() != dataclasses.replace(self.params, seed=0).epoch_part():
            raise SecAggError("the key epoch's parameters changed between advertising and joining",
                              "refusing; the server must start a new epoch")
        if sorted(adverts) != list(params.cohort):
            raise SecAggError("the keys sent are not exactly the cohort's", "refusing this key epoch")
        if adverts[self.node] != self.peers[self.node]:
            raise SecAggError("the keys sent for this node are not the ones it advertised (substituted keys)",
                              "refusing this key epoch: the server or the network altered the keys")
        keys = [a.s_pk for a in adverts.values()] + [a.c_pk for a in adverts.values()]
        if len(set(keys)) != len(keys):
            raise SecAggError("two nodes advertised the same public key", "refusing this key epoch")
        if roster is not None:
            names = [a.name for a in adverts.values()]
            if len(set(names)) != len(names):
                raise SecAggError("two nodes of the cohort claim the same name", "refusing this key epoch")
            for v, a in adverts.items():
                if v == self.node:  # its own keys were checked above; it need not approve itself
                    continue
                pub = roster.get(a.name)
                if pub is None or a.node != v or not _verify_identity(pub, a.identity_sig,
                                                                      a.signed_bytes(params.job, params.epoch)):
                    raise SecAggError(f"the keys of node {a.name!r} are not signed by a key this organization approved "
                                      "for it (node config approved-peers): a peer it did not approve, or "
                                      "substituted keys", "refusing this key epoch; the organization decides who "
                                      "it aggregates with: add the peer's public key (checked out of band) to "
                                      "approved-peers only if it should be in")
            orgs = {organization(a.name) for a in adverts.values()}
            if len(orgs) < min_organizations:
                raise SecAggError(f"the cohort holds {len(orgs)} distinct organization(s) ({', '.join(sorted(orgs))}), "
                                  f"fewer than this node's minimum of {min_organizations}",
                                  "refusing this key epoch (node config secagg-min-organizations)")
        if params.seed != graph_seed(params.job, params.epoch, adverts):
            raise SecAggError("the neighbour graph's seed is not the one the advertised keys determine",
                              "refusing: the server may not choose the graph")
        self.params, self.peers = params, dict(adverts)
        self.neighbours = params.graph[self.node]
        t = params.threshold
        shares = share_secret(self.s_sk, t, len(self.neighbours))
        return {v: seal(self._share_key(v), shares[i], _aad(params, 0, self.node, v, "s"))
                for i, v in enumerate(self.neighbours)}

    def check_round(self, p: Params, rules: NodeRules) -> None:
        """Refuse, before any training, a round this node must not mask."""
        rules.check(p, self.node)
        if p.epoch_part() != self.params.epoch_part():
            raise SecAggError("the round's cohort or graph differs from this key epoch's",
                              "a new cohort needs a new key epoch; refusing")
        if self.revealed_s:
            raise SecAggError(f"this node revealed mask-key shares in key epoch {self.params.epoch}",
                              "the epoch is over for this node: the server must start a new key epoch")
        if p.round <= self.last_round:
            raise SecAggError(f"refusing to mask round {p.round}: this node already masked round {self.last_round}",
                              "a round number may be used once per node (a repeat would expose the difference of "
                              "two updates); the server must move on to a new round")

    def mask(self, p: Params, values: np.ndarray, *, weight: int, rules: NodeRules) -> dict:
        """The masked upload (uint32: the weighted quantized update, then the weight), sealed b-shares,
        a commitment to the self-mask seed and a signature over the round's parameters."""
        self.check_round(p, rules)
        self.last_round, self.round_params = p.round, p
        weight = max(0, min(int(node_weight(weight, p.weighting)), p.max_weight))  # the one weight rule
        L = p.levels
        q = quantize(values, clip=p.clip, levels_=L, rng=np.random.default_rng(secrets.randbits(128)))
        plain = np.concatenate([q * weight, [weight]]).astype(np.int64)
        out = (plain % MOD).astype(np.uint64)
        b = secrets.token_bytes(32)
        out = (out + prg(b, p.round, out.size)) % MOD
        for v in self.neighbours:
            m = prg(self._mask_seed(v), p.round, out.size).astype(np.uint64)
            out = (out + m) % MOD if self.node < v else (out + MOD - m) % MOD
        shares = share_secret(b, p.threshold, len(self.neighbours))
        sealed = {v: seal(self._share_key(v), shares[i], _aad(p, p.round, self.node, v, "b"))
                  for i, v in enumerate(self.neighbours)}
        return {"masked": out.astype(np.uint32), "shares": sealed,
                "commit": commitment(b, job=p.job, epoch=p.epoch, round_=p.round, node=self.node),
                "sig": self._sign(_msg("upload", p))}

    def _commit_to(self, round_: int, survivors: list[int]) -> None:
        had = self.committed.get(round_)
        if had is not None and had != survivors:
            raise SecAggError(f"round {round_}: asked to accept a different set of survivors than before",
                              "refusing: inconsistent survivor lists would let the server unmask a node")
        self.committed[round_] = survivors

    def consistency(self, round_: int, survivors: Sequence[int]) -> bytes:
        """Accept the round's survivor set (only ever one) and sign it for the other survivors."""
        p = self._round(round_)
        survivors = sorted(int(v) for v in survivors)
        if self.node not in survivors or not set(survivors) <= set(p.cohort):
            raise SecAggError("the survivor set does not fit the round's cohort", "refusing")
        self._commit_to(round_, survivors)
        return self._sign(_msg("survivors", p, _survivors_bytes(survivors)))

    def _round(self, round_: int) -> Params:
        if self.round_params is None or round_ != self.last_round:
            raise SecAggError(f"unmask request for round {round_}, but this node's last round is {self.last_round}",
                              "stale or replayed request; refusing")
        return self.round_params

    def reveal(self, round_: int, *, uploaded: Sequence[int], signatures: Mapping[int, bytes],
               survivor_signatures: Mapping[int, bytes], b_shares: Mapping[int, bytes],
               s_shares: Mapping[int, bytes], rules: NodeRules) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Open this node's shares: b for peers that uploaded, s for peers that dropped, after every check.

        Checks: the round this node just masked; every survivor signed the same round parameters; with
        dropouts, every survivor signed the same survivor set (which this node accepted); survivors are
        at least the node's minimum cohort and connected on the graph; never both shares of a peer in
        this epoch. After revealing any mask-key share the epoch is over for this node.
        """
        p = self._round(round_)
        up = sorted(int(v) for v in uploaded)
        dropped = sorted(set(p.cohort) - set(up))
        if self.node not in up or not set(up) <= set(p.cohort) or len(set(up)) != len(up):
            raise SecAggError("the survivor list does not fit the round's cohort", "refusing")
        both = sorted(set(b_shares) & set(self.revealed_s))
        if both:
            raise SecAggError(f"this node revealed the mask-key share of node(s) {both[:3]} earlier in this epoch",
                              "refusing: with its self-mask share as well the server could unmask that node")
        if len(up) < rules.min_cohort:
            raise SecAggError(f"only {len(up)} nodes uploaded, below this node's minimum cohort {rules.min_cohort}",
                              "refusing: a sum over so few nodes reveals too much")
        if not connected(up, p.graph):
            raise SecAggError("the survivors are split on the neighbour graph",
                              "refusing: the server could unmask the sum of each part separately")
        for v in up:
            sig = signatures.get(v)
            if sig is None or not _verify_ed25519(self.peers[v].sign_pk, sig, _msg("upload", p)):
                raise SecAggError(f"node {self.peers[v].name!r} did not sign this round's parameters as this node "
                                  "saw them", "refusing: the server sent nodes different round parameters")
        if dropped:
            data = _msg("survivors", p, _survivors_bytes(up))
            for v in up:
                sig = survivor_signatures.get(v)
                if sig is None or not _verify_ed25519(self.peers[v].sign_pk, sig, data):
                    raise SecAggError(f"node {self.peers[v].name!r} did not sign the same survivor set",
                                      "refusing: the server told nodes different survivor sets")
            if self.committed.get(round_) != up:
                raise SecAggError("this node did not accept this survivor set", "refusing")
        else:
            self._commit_to(round_, up)
        bad_b = sorted(set(b_shares) - (set(up) & set(self.neighbours)))
        bad_s = sorted(set(s_shares) - (set(dropped) & set(self.neighbours)))
        if bad_b or bad_s:
            raise SecAggError(f"asked for shares inconsistent with the round's survivors (b: {bad_b[:3]}, "
                              f"s: {bad_s[:3]})", "refusing the whole request")
        b_out = {v: unseal(self._share_key(v), blob, _aad(p, round_, v, self.node, "b"))
                 for v, blob in b_shares.items()}
        s_out = {v: unseal(self._share_key(v), blob, _aad(p, 0, v, self.node, "s")) for v, blob in s_shares.items()}
        self.revealed_b[round_] = sorted(set(self.revealed_b.get(round_, [])) | set(b_out))
        self.revealed_s = sorted(set(self.revealed_s) | set(s_out))
        return b_out, s_out


# -- the server's side ---------------------------------------------------------------------------
@dataclass
class Epoch:
    """What the server knows of one key epoch: parameters, public keys, encrypted mask-key shares."""

    params: Params
    adverts: dict[int, Advert] = field(default_factory=dict)
    s_shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # holder -> owner -> sealed share

    @property
    def graph(self) -> dict[int, list[int]]:
        return self.params.graph

    def store_shares(self, owner: int, sealed: Mapping[int, bytes]) -> None:
        if sorted(sealed) != self.graph[owner]:
            raise SecAggError(f"node {owner} sent shares for nodes other than its neighbours", "dropping that node")
        for holder, blob in sealed.items():
            self.s_shares.setdefault(holder, {})[owner] = blob


@dataclass
class Upload:
    """One node's masked upload as the server received it."""

    masked: np.ndarray
    shares: dict[int, bytes]  # holder -> sealed b-share
    commit: bytes
    sig: bytes


def check_upload(epoch: Epoch, p: Params, node: int, up: Upload, length: int) -> str | None:
    """Why an upload is unusable (None if fine): wrong size or type, shares not for its neighbours, bad signature."""
    if not isinstance(up.masked, np.ndarray) or up.masked.dtype != np.uint32 or up.masked.shape != (length,):
        return "malformed masked upload"
    if sorted(up.shares) != epoch.graph[node]:
        return "self-mask shares not addressed to its neighbours"
    if len(up.commit) != 32:
        return "malformed commitment"
    if not _verify_ed25519(epoch.adverts[node].sign_pk, up.sig, _msg("upload", p)):
        return "bad signature over the round parameters"
    return None


def unmask(epoch: Epoch, p: Params, *, uploads: Mapping[int, Upload],
           revealed: Mapping[int, tuple[Mapping[int, bytes], Mapping[int, bytes]]]) -> np.ndarray:
    """The sum of the uploaded (weighted, quantized) vectors in Z_(2^32), masks removed.

    Every reconstructed secret is checked (self-mask seeds against the owner's commitment, mask
    keys against its public key); with more than t shares, other subsets are tried when one
    fails its check, so a single corrupted share does not corrupt the sum.

    Raises:
        SecAggError: too few shares, or no subset of the shares passes the check.
    """
    if not uploads:
        raise SecAggError("no node uploaded", "the round fails; the model is unchanged")
    up = sorted(uploads)
    dropped = sorted(set(p.cohort) - set(up))
    length = next(iter(uploads.values())).masked.size
    b_got: dict[int, list[bytes]] = {}
    s_got: dict[int, list[bytes]] = {}
    for _, (b, s) in revealed.items():
        for o, share in b.items():
            b_got.setdefault(o, []).append(share)
        for d, share in s.items():
            s_got.setdefault(d, []).append(share)
    total = np.zeros(length, np.uint64)
    for u in up:
        total = (total + uploads[u].masked.astype(np.uint64)) % MOD
    for u in up:
        b = _reconstruct(b_got.get(u, []), p.threshold, what=f"node {u}'s self mask", round_=p.round,
                         ok=lambda s, u=u: commitment(s, job=p.job, epoch=p.epoch, round_=p.round,
                                                      node=u) == uploads[u].commit)
        total = (total + MOD - prg(b, p.round, length).astype(np.uint64)) % MOD
    for d in dropped:
        s_sk = _reconstruct(s_got.get(d, []), p.threshold, what=f"dropped node {d}'s masks", round_=p.round,
                            ok=lambda s, d=d: _public_of(s) == epoch.adverts[d].s_pk)
        for v in (v for v in epoch.graph[d] if v in uploads):
            a, b_ = sorted((d, v))
            seed = agree(s_sk, epoch.adverts[v].s_pk, f"pair|{p.job}|{p.epoch}|{a}|{b_}".encode())
            m = prg(seed, p.round, length).astype(np.uint64)
            # v added +m if v < d, else -m: undo it
            total = (total + MOD - m) % MOD if v < d else (total + m) % MOD
    return total.astype(np.uint32)


def _public_of(sk: bytes) -> bytes:
    return _raw(X25519PrivateKey.from_private_bytes(sk).public_key())


def _reconstruct(shares: list[bytes], t: int, *, what: str, round_: int, ok) -> bytes:
    if len(shares) < t:
        raise SecAggError(f"round {round_}: only {len(shares)} of the {t} shares needed to remove {what} arrived",
                          "too many nodes dropped out; the round fails, model unchanged")
    for i, subset in enumerate(combinations(shares, t)):
        if i >= MAX_COMBINATIONS:
            break
        try:
            secret = combine_secret(list(subset))
        except (SecAggError, ValueError):
            continue
        if ok(secret):
            return secret
    raise SecAggError(f"round {round_}: no {t} of the {len(shares)} shares of {what} reconstruct a secret that "
                      "passes its check (a corrupted share)", "the round fails, model unchanged")


def split_sum(total: np.ndarray) -> tuple[np.ndarray, int]:
    """(weighted quantized sum, weight sum) from an unmasked total."""
    return total[:-1], int(total[-1].astype(np.uint32).view(np.int32))
