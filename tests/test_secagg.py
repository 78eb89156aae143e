"""The secure-aggregation protocol on its own: exact sums, uniform-looking uploads, dropouts, tampering."""

from __future__ import annotations

import numpy as np
import pytest

from common import secagg as sa

CLIP = 1.0


def setup(n: int, *, epoch: int = 1, absent: set[int] = frozenset(), degree: int | None = None):
    """Key epoch for nodes 0..n-1; ``absent`` advertise keys but never send their shares."""
    keys = {i: sa.NodeKeys.generate(epoch=epoch, index=i) for i in range(n)}
    roster = {i: (k.s_pk, k.c_pk) for i, k in keys.items()}
    ep = sa.Epoch.create(epoch, roster, degree=degree)
    for i, k in keys.items():
        sealed = k.join(roster, ep.neighbours[i], ep.threshold)
        if i not in absent:
            ep.store_shares(i, sealed)
    return keys, ep


def run_round(keys, ep, rnd, values, weights, *, participants=None, drop_before_upload=(), drop_before_unmask=()):
    participants = sorted(participants if participants is not None else keys)
    L = sa.levels(n_nodes=len(participants), max_weight=max(weights.values()))
    uploads, bsh = {}, {}
    for i in participants:
        if i in drop_before_upload:
            continue
        uploads[i], bsh[i] = keys[i].mask(rnd, values[i], weight=weights[i], participants=participants,
                                          clip=CLIP, levels_=L)
    plan = sa.plan_unmask(ep, participants=participants, uploads=uploads, b_shares=bsh)
    revealed = {h: keys[h].reveal(rnd, uploaded=plan.uploaded, dropped=plan.dropped, b_shares=req[0],
                                  s_shares=req[1])
                for h, req in plan.requests.items() if h not in drop_before_unmask}
    total = sa.unmask(ep, rnd, plan=plan, uploads=uploads, revealed=revealed)
    return total, uploads, L, plan


def _vals(n, d=500, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-0.9, 0.9, d).astype(np.float32) for i in range(n)}


def test_quantization_error_within_bound():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 10_000)
    L = sa.levels(n_nodes=10, max_weight=100)
    q = sa.quantize(x, clip=CLIP, levels_=L, rng=rng)
    back = sa.dequantize_sum((q % sa.MOD).astype(np.uint32), clip=CLIP, levels_=L)
    assert np.abs(back - x).max() <= CLIP / L
    # unbiased: the mean error over many roundings is far below one step
    assert abs(np.mean(back - x)) < 0.05 * CLIP / L
    # clipping
    assert sa.dequantize_sum((sa.quantize(np.array([5.0, -5.0]), clip=CLIP, levels_=L, rng=rng) % sa.MOD)
                             .astype(np.uint32), clip=CLIP, levels_=L).tolist() == [1.0, -1.0]


def test_masked_sum_equals_plaintext_sum_exactly():
    keys, ep = setup(5)
    vals, w = _vals(5), {i: 10 * (i + 1) for i in range(5)}
    total, _, L, _ = run_round(keys, ep, 1, vals, w)
    # the plaintext the nodes would have sent, summed mod 2^32: reproduce with the same quantization by
    # checking the weight slot exactly and the values within the rounding bound
    summed, wsum = sa.split_sum(total)
    assert wsum == sum(w.values())
    got = sa.dequantize_sum(summed, clip=CLIP, levels_=L)
    want = sum(w[i] * vals[i].astype(np.float64) for i in range(5))
    assert np.abs(got - want).max() <= sa.error_bound(clip=CLIP, levels_=L, n_nodes=5, weight_sum=wsum)
    # exactness in Z_2^32: unmasked total == sum of each node's own (unmasked) quantized vector
    assert total.dtype == np.uint32 and total.size == 501


def test_exact_integer_sum_mod_2_32():
    """With integer inputs (no rounding) the unmasked result is the plaintext sum mod 2^32, bit for bit."""
    keys, ep = setup(4)
    L = sa.levels(n_nodes=4, max_weight=1)
    ints = {i: np.arange(100) * (i + 1) - 50 * i for i in range(4)}
    vals = {i: ints[i].astype(np.float64) / L * CLIP for i in range(4)}  # exactly representable levels
    total, *_ = run_round(keys, ep, 1, vals, {i: 1 for i in range(4)})
    summed, wsum = sa.split_sum(total)
    want = (sum(ints.values()) % sa.MOD).astype(np.uint32)
    assert wsum == 4 and np.array_equal(summed, want)


def chi_square_bytes(b: bytes) -> float:
    counts = np.bincount(np.frombuffer(b, np.uint8), minlength=256)
    expected = len(b) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_upload_looks_uniform_and_masks_change_every_round():
    keys, ep = setup(3)
    zeros = {i: np.zeros(20_000, np.float32) for i in range(3)}  # the most structured plaintext possible
    _, up1, _, _ = run_round(keys, ep, 1, zeros, {i: 1 for i in range(3)})
    _, up2, _, _ = run_round(keys, ep, 2, zeros, {i: 1 for i in range(3)})
    for up in (up1[0], up2[0]):
        # 255 degrees of freedom: the 99.9% quantile is about 330
        assert chi_square_bytes(up.tobytes()) < 330
        assert not np.array_equal(up[:-1], np.zeros(20_000, np.uint32))
    assert np.mean(up1[0] == up2[0]) < 0.001  # same plaintext, different round: unrelated masks
    assert chi_square_bytes(np.zeros(80_000, np.uint8).tobytes()) > 1e6  # the test can fail


@pytest.mark.parametrize("stage", ["after_keys", "after_sharing", "after_upload"])
def test_dropouts_up_to_tolerance_give_the_survivors_exact_sum(stage):
    n = 7
    absent = {6} if stage == "after_keys" else set()
    keys, ep = setup(n, absent=absent)
    vals, w = _vals(n, d=64), {i: 1 for i in range(n)}
    participants = [i for i in range(n) if i not in absent]
    t = ep.threshold  # of 6 neighbours
    tolerated = 6 - t  # a node's secret needs t shares among its surviving neighbours
    kw = {}
    dropped = set(range(tolerated))
    if stage == "after_sharing":
        kw["drop_before_upload"] = dropped
    elif stage == "after_upload":
        kw["drop_before_unmask"] = dropped
    total, _, L, _ = run_round(keys, ep, 1, vals, w, participants=participants, **kw)
    summed, wsum = sa.split_sum(total)
    senders = [i for i in participants if not (stage == "after_sharing" and i in dropped)]
    assert wsum == len(senders)
    want = sum(vals[i].astype(np.float64) for i in senders)
    assert np.abs(sa.dequantize_sum(summed, clip=CLIP, levels_=L) - want).max() <= len(senders) * CLIP / L


@pytest.mark.parametrize("stage", ["after_sharing", "after_upload"])
def test_one_dropout_too_many_fails_the_round_cleanly(stage):
    n = 7
    keys, ep = setup(n)
    vals, w = _vals(n, d=16), {i: 1 for i in range(n)}
    dropped = set(range(6 - ep.threshold + 1))
    kw = {"drop_before_upload": dropped} if stage == "after_sharing" else {"drop_before_unmask": dropped}
    with pytest.raises(sa.SecAggError, match="too many nodes dropped out"):
        run_round(keys, ep, 1, vals, w, **kw)


def test_tampered_or_replayed_shares_are_rejected():
    keys, _ = setup(3)
    vals = _vals(3, d=8)
    up, bsh = {}, {}
    for i in range(3):
        up[i], bsh[i] = keys[i].mask(1, vals[i], weight=1, participants=[0, 1, 2], clip=CLIP, levels_=1000)
    good = bsh[1][0]
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(sa.SecAggError, match="failed authentication"):
        keys[0].reveal(1, uploaded=[0, 1, 2], dropped=[], b_shares={1: tampered}, s_shares={})
    # node 2's share for node 0 presented as node 1's (wrong sender)
    with pytest.raises(sa.SecAggError, match="failed authentication"):
        keys[0].reveal(1, uploaded=[0, 1, 2], dropped=[], b_shares={1: bsh[2][0]}, s_shares={})
    # a share from round 1 replayed in round 2 (wrong round)
    for i in range(3):
        keys[i].mask(2, vals[i], weight=1, participants=[0, 1, 2], clip=CLIP, levels_=1000)
    with pytest.raises(sa.SecAggError, match="failed authentication"):
        keys[0].reveal(2, uploaded=[0, 1, 2], dropped=[], b_shares={1: good}, s_shares={})
    # an unmask request for an old round is refused outright
    with pytest.raises(sa.SecAggError, match="stale or replayed"):
        keys[0].reveal(1, uploaded=[0, 1, 2], dropped=[], b_shares={1: good}, s_shares={})


def test_a_node_never_reveals_both_shares_of_a_peer():
    keys, ep = setup(4)
    vals = _vals(4, d=8)
    up, bsh = {}, {}
    for i in range(4):
        up[i], bsh[i] = keys[i].mask(1, vals[i], weight=1, participants=[0, 1, 2, 3], clip=CLIP, levels_=1000)
    with pytest.raises(sa.SecAggError, match="both uploaded and dropped"):
        keys[0].reveal(1, uploaded=[1, 2], dropped=[2], b_shares={}, s_shares={})
    keys[0].reveal(1, uploaded=[0, 1, 2, 3], dropped=[], b_shares={1: bsh[1][0]}, s_shares={})
    with pytest.raises(sa.SecAggError, match="already revealed the other share"):
        keys[0].reveal(1, uploaded=[0, 2, 3], dropped=[1], b_shares={}, s_shares={1: ep.s_shares[0][1]})


def test_a_round_number_is_masked_only_once():
    keys, _ = setup(2)
    keys[0].mask(3, np.zeros(4), weight=1, participants=[0, 1], clip=CLIP, levels_=10)
    with pytest.raises(sa.SecAggError, match="refusing to mask round 3"):
        keys[0].mask(3, np.ones(4), weight=1, participants=[0, 1], clip=CLIP, levels_=10)


def test_neighbour_graph_is_regular_and_logarithmic():
    nodes = list(range(100))
    k = sa.default_degree(100)
    g = sa.neighbour_graph(nodes, degree=k, seed=1)
    assert all(len(v) == k for v in g.values()) and k < 30
    assert all(u in g[v] for u in g for v in g[u])  # symmetric
    assert sa.neighbour_graph([1, 2, 3], degree=sa.default_degree(3), seed=0) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}


def test_secagg_plus_with_a_sparse_graph_sums_exactly():
    keys, ep = setup(40, degree=8)
    vals, w = _vals(40, d=32), {i: 3 for i in range(40)}
    total, _, L, _ = run_round(keys, ep, 1, vals, w, drop_before_upload={5, 17})
    summed, wsum = sa.split_sum(total)
    senders = [i for i in range(40) if i not in (5, 17)]
    assert wsum == 3 * len(senders)
    want = sum(3 * vals[i].astype(np.float64) for i in senders)
    assert np.abs(sa.dequantize_sum(summed, clip=CLIP, levels_=L) - want).max() <= 3 * len(senders) * CLIP / L
