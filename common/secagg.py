"""Secure aggregation (SecAgg / SecAgg+, multi-round as in Flamingo): the pure protocol, no Flower.

Primitives are composed, never written here: X25519 key agreement, HKDF-SHA256,
AES-GCM and the ChaCha20 stream cipher from ``cryptography``; Shamir secret
sharing over GF(2^128) from ``pycryptodome``.

Per key epoch (the first round, and again after any node's mask key had to be
revealed), every node makes two X25519 key pairs: ``s`` for pairwise mask seeds
and ``c`` for encrypting shares. Nodes are placed on a k-regular neighbour graph
(complete for small rosters); each Shamir-shares its ``s`` secret key with its
neighbours (threshold t), encrypted under ``HKDF(X25519(c_u, c_v))`` with the
epoch, sender, receiver and kind bound as associated data.

Per round r, a node quantizes its update to Z_(2^32) (clip to [-R, R], unbiased
stochastic rounding to L levels per unit R), multiplies by its integer weight,
appends the weight, and adds its fresh self mask PRG(b_u,r) and, for every
neighbour v also in the round, +PRG(s_uv, r) if u < v else -PRG(s_uv, r).
It uploads the uint32 vector with its encrypted shares of b_u,r. The server
then asks the survivors for b-shares of nodes that uploaded and s-shares of
nodes that dropped (never both for one node), reconstructs, removes the
masks and learns only the sum.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import FedtuneError

MOD_BITS = 32
MOD = 1 << MOD_BITS


class SecAggError(FedtuneError):
    """Raised when a protocol step cannot proceed safely (tampering, replay, too many dropouts)."""


# -- primitives, composed ----------------------------------------------------------------------
def _raw(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedtune-secagg|" + info).derive(secret)


def agree(sk: bytes, peer_pk: bytes, info: bytes) -> bytes:
    """A 256-bit key from X25519(sk, peer_pk) through HKDF, bound to ``info``."""
    shared = X25519PrivateKey.from_private_bytes(sk).exchange(X25519PublicKey.from_public_bytes(peer_pk))
    return _kdf(shared, info)


def prg(seed: bytes, round_: int, length: int) -> np.ndarray:
    """``length`` uint32 words of the ChaCha20 keystream under a per-round key derived from ``seed``."""
    key = _kdf(seed, b"mask|" + struct.pack(">Q", round_))
    enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (4 * length)), dtype="<u4").astype(np.uint32)


def _aad(epoch: int, round_: int, sender: int, receiver: int, kind: str) -> bytes:
    return f"{epoch}|{round_}|{sender}|{receiver}|{kind}".encode()


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

    lo = [(struct.unpack(">H", s[:2])[0], s[2:18]) for s in shares]
    hi = [(struct.unpack(">H", s[:2])[0], s[18:34]) for s in shares]
    return Shamir.combine(lo, ssss=False) + Shamir.combine(hi, ssss=False)


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
def levels(*, n_nodes: int, max_weight: int) -> int:
    """Integer levels per unit clip range so that a sum of n weighted values cannot wrap around 2^32."""
    return max(1, (2 ** (MOD_BITS - 1) - 1) // (n_nodes * max_weight))


def quantize(x: np.ndarray, *, clip: float, levels_: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip], scale to [-L, L] and round stochastically (unbiased); int64 result."""
    scaled = np.clip(np.asarray(x, np.float64), -clip, clip) / clip * levels_
    low = np.floor(scaled)
    return (low + (rng.random(scaled.shape) < (scaled - low))).astype(np.int64)


def dequantize_sum(total: np.ndarray, *, clip: float, levels_: int) -> np.ndarray:
    """A sum in Z_(2^32) back to floats (read as signed 32-bit)."""
    signed = total.astype(np.uint32).view(np.int32).astype(np.float64)
    return signed / levels_ * clip


def error_bound(*, clip: float, levels_: int, n_nodes: int, weight_sum: float) -> float:
    """Max |dequantized weighted sum - clipped float weighted sum| per coordinate (stochastic rounding)."""
    return clip / levels_ * weight_sum if n_nodes else 0.0


# -- the neighbour graph -----------------------------------------------------------------------
def neighbour_graph(nodes: Sequence[int], *, degree: int, seed: int) -> dict[int, list[int]]:
    """A k-regular circulant graph over a seeded permutation; the complete graph when degree >= n-1."""
    nodes = sorted(nodes)
    n = len(nodes)
    if degree >= n - 1:
        return {u: [v for v in nodes if v != u] for u in nodes}
    order = nodes[:]
    random.Random(seed).shuffle(order)
    half = max(1, degree // 2)
    out: dict[int, set[int]] = {u: set() for u in nodes}
    for i, u in enumerate(order):
        for d in range(1, half + 1):
            v = order[(i + d) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: sorted(vs) for u, vs in out.items()}


def default_degree(n: int) -> int:
    """SecAgg+ neighbourhood size: O(log n), even, at least 4 (complete graph for small n)."""
    k = 2 * math.ceil(1.5 * math.log2(max(n, 2)))
    return n - 1 if n <= k + 1 else k


def threshold(n_neighbours: int, fraction: float) -> int:
    return min(n_neighbours, max(1, math.floor(fraction * n_neighbours) + 1))


# -- the node's side -----------------------------------------------------------------------------
@dataclass
class NodeKeys:
    """A node's secret state for one key epoch (kept on the node only)."""

    epoch: int
    index: int
    s_sk: bytes
    c_sk: bytes
    s_pk: bytes = b""
    c_pk: bytes = b""
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # index -> (s_pk, c_pk)
    neighbours: list[int] = field(default_factory=list)
    threshold: int = 0
    last_round: int = 0  # the last round this node masked an update for: never mask again at or below it
    revealed: dict[int, dict[int, str]] = field(default_factory=dict)  # round -> peer -> "b" | "s"
    b_seeds: dict[int, bytes] = field(default_factory=dict)  # round -> self-mask seed (until unmasked)

    @classmethod
    def generate(cls, *, epoch: int, index: int) -> NodeKeys:
        s, c = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return cls(epoch=epoch, index=index, s_sk=s.private_bytes(*raw), c_sk=c.private_bytes(*raw),
                   s_pk=_raw(s.public_key()), c_pk=_raw(c.public_key()))

    def dumps(self) -> bytes:
        """JSON (never pickle) for the node's own state store."""
        return json.dumps({
            "epoch": self.epoch, "index": self.index, "s_sk": self.s_sk.hex(), "c_sk": self.c_sk.hex(),
            "s_pk": self.s_pk.hex(), "c_pk": self.c_pk.hex(), "threshold": self.threshold,
            "last_round": self.last_round, "neighbours": self.neighbours,
            "roster": {str(i): [a.hex(), b.hex()] for i, (a, b) in self.roster.items()},
            "revealed": {str(r): {str(p): k for p, k in d.items()} for r, d in self.revealed.items()},
            "b_seeds": {str(r): b.hex() for r, b in self.b_seeds.items()},
        }).encode()

    @classmethod
    def loads(cls, raw: bytes) -> NodeKeys:
        d = json.loads(raw)
        return cls(epoch=d["epoch"], index=d["index"], s_sk=bytes.fromhex(d["s_sk"]), c_sk=bytes.fromhex(d["c_sk"]),
                   s_pk=bytes.fromhex(d["s_pk"]), c_pk=bytes.fromhex(d["c_pk"]), threshold=d["threshold"],
                   last_round=d["last_round"], neighbours=list(d["neighbours"]),
                   roster={int(i): (bytes.fromhex(a), bytes.fromhex(b)) for i, (a, b) in d["roster"].items()},
                   revealed={int(r): {int(p): k for p, k in v.items()} for r, v in d["revealed"].items()},
                   b_seeds={int(r): bytes.fromhex(b) for r, b in d["b_seeds"].items()})

    def check_round(self, round_: int) -> None:
        """Refuse, before any training, a round this node cannot mask (already used)."""
        if round_ <= self.last_round:
            raise SecAggError(f"refusing to mask round {round_}: this node already masked round {self.last_round}",
                              "a round number may be used once per node (a repeat would expose the difference of "
                              "two updates); the server must move on to a new round")

    def _share_key(self, peer: int) -> bytes:
        a, b = sorted((self.index, peer))
        return agree(self.c_sk, self.roster[peer][1], f"share|{self.epoch}|{a}|{b}".encode())

    def _mask_seed(self, peer: int) -> bytes:
        a, b = sorted((self.index, peer))
        return agree(self.s_sk, self.roster[peer][0], f"pair|{self.epoch}|{a}|{b}".encode())

    def join(self, roster: Mapping[int, tuple[bytes, bytes]], neighbours: Sequence[int],
             t: int) -> dict[int, bytes]:
        """Accept the epoch's roster; return this node's s-key shares, encrypted per neighbour."""
        if self.index not in roster or roster[self.index] != (self.s_pk, self.c_pk):
            raise SecAggError("the roster does not hold this node's own public keys",
                              "the server mixed up key epochs; the node re-keys at the next setup")
        if len(set(roster[i][0] for i in roster)) != len(roster):
            raise SecAggError("the roster repeats a public key", "discard this epoch")
        self.roster, self.neighbours, self.threshold = dict(roster), sorted(neighbours), t
        shares = share_secret(self.s_sk, t, len(self.neighbours))
        return {v: seal(self._share_key(v), shares[i], _aad(self.epoch, 0, self.index, v, "s"))
                for i, v in enumerate(self.neighbours)}

    def mask(self, round_: int, values: np.ndarray, *, weight: int, participants: Sequence[int], clip: float,
             levels_: int) -> tuple[np.ndarray, dict[int, bytes]]:
        """The masked upload (uint32; the weighted quantized update then the weight) and encrypted b-shares.

        Raises:
            SecAggError: if asked to mask a second update for a round at or below the last one.
        """
        self.check_round(round_)
        if self.index not in participants:
            raise SecAggError("this node is not among the round's participants", "check the server's roster")
        self.last_round = round_
        q = quantize(values, clip=clip, levels_=levels_, rng=np.random.default_rng(secrets.randbits(64)))
        plain = np.concatenate([q * int(weight), [int(weight)]]).astype(np.int64)
        out = (plain % MOD).astype(np.uint64)
        b = secrets.token_bytes(32)
        self.b_seeds[round_] = b
        out = (out + prg(b, round_, out.size)) % MOD
        live = [v for v in self.neighbours if v in set(participants)]
        for v in live:
            m = prg(self._mask_seed(v), round_, out.size).astype(np.uint64)
            out = (out + m) % MOD if self.index < v else (out + MOD - m) % MOD
        t = min(self.threshold, len(live)) if live else 0
        shares = share_secret(b, t, len(live)) if live else []
        enc = {v: seal(self._share_key(v), shares[i], _aad(self.epoch, round_, self.index, v, "b"))
               for i, v in enumerate(live)}
        return out.astype(np.uint32), enc

    def reveal(self, round_: int, *, uploaded: Sequence[int], dropped: Sequence[int],
               b_shares: Mapping[int, bytes], s_shares: Mapping[int, bytes]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Decrypt and return this node's shares: b for peers that uploaded, s for peers that dropped.

        Never both for one peer in a round; every share is authenticated for this epoch, round,
        sender and receiver.
        """
        up, dr = set(uploaded), set(dropped)
        if up & dr:
            raise SecAggError(f"round {round_}: nodes {sorted(up & dr)[:5]} claimed both uploaded and dropped",
                              "refusing: revealing both shares would unmask those nodes' updates")
        if round_ != self.last_round:
            raise SecAggError(f"unmask request for round {round_}, but this node's last round is {self.last_round}",
                              "stale or replayed request; ignored")
        done = self.revealed.setdefault(round_, {})
        for peer, kind in [(p, "b") for p in b_shares] + [(p, "s") for p in s_shares]:
            if (kind == "b" and peer not in up) or (kind == "s" and peer not in dr):
                raise SecAggError(f"asked for a {kind}-share of node {peer} inconsistent with the round's lists",
                                  "refusing the whole request")
            if done.get(peer, kind) != kind:
                raise SecAggError(f"already revealed the other share of node {peer} this round",
                                  "refusing: both shares would unmask that node")
        b_out = {p: unseal(self._share_key(p), blob, _aad(self.epoch, round_, p, self.index, "b"))
                 for p, blob in b_shares.items()}
        s_out = {p: unseal(self._share_key(p), blob, _aad(self.epoch, 0, p, self.index, "s"))
                 for p, blob in s_shares.items()}
        for p in b_out:
            done[p] = "b"
        for p in s_out:
            done[p] = "s"
        return b_out, s_out


# -- the server's side ---------------------------------------------------------------------------
@dataclass
class Epoch:
    """What the server knows of one key epoch: public keys, graph, encrypted s-key shares."""

    number: int
    roster: dict[int, tuple[bytes, bytes]]
    neighbours: dict[int, list[int]]
    threshold: int
    s_shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # holder -> owner -> sealed share

    @classmethod
    def create(cls, number: int, roster: Mapping[int, tuple[bytes, bytes]], *, degree: int | None = None,
               threshold_fraction: float = 0.5, seed: int = 0) -> Epoch:
        nodes = sorted(roster)
        k = default_degree(len(nodes)) if degree is None else min(degree, len(nodes) - 1)
        graph = neighbour_graph(nodes, degree=k, seed=seed + number)
        t = threshold(min(len(v) for v in graph.values()), threshold_fraction) if nodes else 1
        return cls(number, dict(roster), graph, t)

    def store_shares(self, owner: int, sealed: Mapping[int, bytes]) -> None:
        for holder, blob in sealed.items():
            if holder not in self.neighbours.get(owner, []):
                raise SecAggError(f"node {owner} sent a share for non-neighbour {holder}", "discard that node")
            self.s_shares.setdefault(holder, {})[owner] = blob


@dataclass
class RoundPlan:
    """The server's plan for unmasking one round."""

    uploaded: list[int]
    dropped: list[int]
    requests: dict[int, tuple[dict[int, bytes], dict[int, bytes]]]  # holder -> (b-shares, s-shares) to decrypt


def plan_unmask(epoch: Epoch, *, participants: Sequence[int], uploads: Mapping[int, np.ndarray],
                b_shares: Mapping[int, Mapping[int, bytes]]) -> RoundPlan:
    """Which shares to ask each surviving node for. ``b_shares[owner][holder]`` came with the uploads."""
    uploaded = sorted(uploads)
    dropped = sorted(set(participants) - set(uploaded))
    requests = {}
    for h in uploaded:
        b = {o: b_shares[o][h] for o in uploaded if h in b_shares.get(o, {})}
        s = {d: epoch.s_shares[h][d] for d in dropped if d in epoch.s_shares.get(h, {})}
        requests[h] = (b, s)
    return RoundPlan(uploaded, dropped, requests)


def unmask(epoch: Epoch, round_: int, *, plan: RoundPlan, uploads: Mapping[int, np.ndarray],
           revealed: Mapping[int, tuple[Mapping[int, bytes], Mapping[int, bytes]]]) -> np.ndarray:
    """The sum of the uploaded (weighted, quantized) vectors in Z_(2^32), masks removed.

    Raises:
        SecAggError: when fewer than t shares of a needed secret arrived (too many dropouts).
    """
    if not plan.uploaded:
        raise SecAggError("no node uploaded", "the round fails; the model is unchanged")
    length = next(iter(uploads.values())).size
    b_got: dict[int, list[bytes]] = {}
    s_got: dict[int, list[bytes]] = {}
    for _, (b, s) in revealed.items():
        for o, share in b.items():
            b_got.setdefault(o, []).append(share)
        for d, share in s.items():
            s_got.setdefault(d, []).append(share)
    total = np.zeros(length, np.uint64)
    for u in plan.uploaded:
        total = (total + uploads[u].astype(np.uint64)) % MOD
    part = set(plan.uploaded) | set(plan.dropped)
    for u in plan.uploaded:
        live = [v for v in epoch.neighbours[u] if v in part]
        if not live:
            continue
        need = min(epoch.threshold, len(live))
        got = b_got.get(u, [])
        if len(got) < need:
            raise SecAggError(f"round {round_}: only {len(got)} of the {need} shares needed to remove node {u}'s "
                              "self mask arrived", "too many nodes dropped out; the round fails, model unchanged")
        b = combine_secret(got[:need])
        total = (total + MOD - prg(b, round_, length).astype(np.uint64)) % MOD
    for d in plan.dropped:
        live = [v for v in epoch.neighbours[d] if v in set(plan.uploaded)]
        if not live:
            continue
        got = s_got.get(d, [])
        need = epoch.threshold
        if len(got) < need:
            raise SecAggError(f"round {round_}: only {len(got)} of the {need} shares needed to remove dropped node "
                              f"{d}'s masks arrived", "too many nodes dropped out; the round fails, model unchanged")
        s_sk = combine_secret(got[:need])
        if _raw(X25519PrivateKey.from_private_bytes(s_sk).public_key()) != epoch.roster[d][0]:
            raise SecAggError(f"reconstructed key of node {d} does not match its public key",
                              "a share was wrong; the round fails")
        for v in live:
            a, b_ = sorted((d, v))
            seed = agree(s_sk, epoch.roster[v][0], f"pair|{epoch.number}|{a}|{b_}".encode())
            m = prg(seed, round_, length).astype(np.uint64)
            # v added +m if v < d, else -m: undo it
            total = (total + MOD - m) % MOD if v < d else (total + m) % MOD
    return total.astype(np.uint32)


def split_sum(total: np.ndarray) -> tuple[np.ndarray, int]:
    """(weighted quantized sum, weight sum) from an unmasked total."""
    return total[:-1], int(total[-1].astype(np.uint32).view(np.int32))


def fingerprint(epoch: Epoch) -> str:
    h = hashlib.sha256()
    for i in sorted(epoch.roster):
        h.update(struct.pack(">I", i) + epoch.roster[i][0] + epoch.roster[i][1])
    return h.hexdigest()[:16]
