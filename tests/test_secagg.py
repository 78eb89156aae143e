"""The secure-aggregation protocol on its own: exact sums for every cohort, dropouts, tampering, and a
scripted malicious server that tries each known attack on the nodes (every one refused)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fedtune.common.secagg import protocol as sa

CLIP = 1.0
RULES = sa.NodeRules()


class Cohort:
    """Honest nodes and a server that follows the protocol unless a test makes it lie."""

    def __init__(self, ids, *, epoch=1, degree=None, threshold=None, job="job", identities=None, roster=None,
                 max_weight=1000, weighting="weighted"):
        ids = sorted(ids)
        n = len(ids)
        degree = sa.default_degree(n) if degree is None else degree
        k = sa.effective_degree(n, degree)
        self.params = sa.Params(job=job, epoch=epoch, cohort=tuple(ids), seed=0, degree=degree,
                                threshold=sa.threshold(k, 0.5) if threshold is None else threshold,
                                clip=CLIP, max_weight=max_weight, weighting=weighting)
        self.keys, adverts = {}, {}
        for i in ids:
            ident = (identities or {}).get(i)
            self.keys[i], adverts[i] = sa.NodeKeys.generate(self.params, node=i, name=f"org-{i}", rules=RULES,
                                                            identity=ident)
        self.params = dataclasses.replace(self.params, seed=sa.graph_seed(job, epoch, adverts))
        self.epoch = sa.Epoch(params=self.params, adverts=adverts)
        for i in ids:
            self.epoch.store_shares(i, self.keys[i].join(self.params, adverts, roster=roster))

    @property
    def ids(self):
        return list(self.params.cohort)

    def upload(self, rnd, values, weights, *, skip=()):
        p = dataclasses.replace(self.params, round=rnd)
        ups = {}
        for i in self.ids:
            if i in skip:
                continue
            out = self.keys[i].mask(p, values[i], weight=weights[i], rules=RULES)
            ups[i] = sa.Upload(masked=out["masked"], shares=out["shares"], commit=out["commit"], sig=out["sig"])
        return p, ups

    def unmask_requests(self, p, ups, *, uploaded=None):
        up = sorted(ups if uploaded is None else uploaded)
        dropped = sorted(set(self.ids) - set(up))
        survivor_sigs = {v: self.keys[v].consistency(p.round, up) for v in up} if dropped else {}
        sigs = {u: ups[u].sig for u in up if u in ups}
        reqs = {}
        for h in up:
            b = {o: ups[o].shares[h] for o in up if o in ups and h in ups[o].shares}
            s = {d: self.epoch.s_shares[h][d] for d in dropped if d in self.epoch.s_shares.get(h, {})}
            reqs[h] = dict(uploaded=up, signatures=sigs, survivor_signatures=survivor_sigs, b_shares=b, s_shares=s)
        return reqs

    def round(self, rnd, values, weights, *, drop_before_upload=(), drop_before_unmask=()):
        p, ups = self.upload(rnd, values, weights, skip=drop_before_upload)
        reqs = self.unmask_requests(p, ups)
        revealed = {h: self.keys[h].reveal(rnd, rules=RULES, **req) for h, req in reqs.items()
                    if h not in drop_before_unmask}
        return sa.unmask(self.epoch, p, uploads=ups, revealed=revealed), ups, p


def _error_bound(*, clip: float, levels_: int, n_nodes: int, weight_sum: float) -> float:
    """Max |dequantized weighted sum - clipped float weighted sum| per coordinate (stochastic rounding)."""
    return clip / levels_ * weight_sum if n_nodes else 0.0


def _vals(ids, d=64, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-0.9, 0.9, d).astype(np.float32) for i in ids}


def _within(total, p, values, weights, senders):
    summed, wsum = sa.split_sum(total)
    assert wsum == sum(weights[i] for i in senders)
    want = sum(weights[i] * values[i].astype(np.float64) for i in senders)
    got = sa.dequantize_sum(summed, clip=CLIP, levels_=p.levels)
    assert np.abs(got - want).max() <= _error_bound(clip=CLIP, levels_=p.levels, n_nodes=len(senders),
                                                      weight_sum=wsum)


# -- arithmetic --------------------------------------------------------------------------------
def test_quantization_error_within_bound():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 10_000)
    L = sa.levels(n_nodes=10, max_weight=100)
    q = sa.quantize(x, clip=CLIP, levels_=L, rng=rng)
    back = sa.dequantize_sum((q % sa.MOD).astype(np.uint32), clip=CLIP, levels_=L)
    assert np.abs(back - x).max() <= CLIP / L
    assert abs(np.mean(back - x)) < 0.05 * CLIP / L  # unbiased
    assert sa.dequantize_sum((sa.quantize(np.array([5.0, -5.0]), clip=CLIP, levels_=L, rng=rng) % sa.MOD)
                             .astype(np.uint32), clip=CLIP, levels_=L).tolist() == [1.0, -1.0]


def test_quantization_that_would_wrap_is_an_error_naming_the_fix():
    with pytest.raises(sa.SecAggError, match="lower fed.secagg-max-weight to at most"):
        sa.levels(n_nodes=5, max_weight=10**9)
    assert sa.levels(n_nodes=5, max_weight=100_000) == (2**31 - 1) // 500_000


def test_the_sum_is_exact_for_every_cohort_the_server_can_form():
    """Integer inputs (no rounding): for every cohort of at least 3 of 7 nodes, the unmasked result is the
    plaintext sum mod 2^32, bit for bit."""
    population = [11, 22, 33, 44, 55, 66, 77]
    L = sa.levels(n_nodes=7, max_weight=1)
    ints = {i: (np.arange(40) * (k + 1) - 20 * k) for k, i in enumerate(population)}
    checked = 0
    for size in range(3, 8):
        for cohort in itertools.combinations(population, size):
            c = Cohort(cohort, max_weight=1)
            lv = c.params.levels
            vals = {i: ints[i].astype(np.float64) / lv * CLIP for i in cohort}  # exactly representable levels
            total, _, _ = c.round(1, vals, {i: 1 for i in cohort})
            summed, wsum = sa.split_sum(total)
            assert wsum == size and np.array_equal(summed, (sum(ints[i] for i in cohort) % sa.MOD).astype(np.uint32))
            checked += 1
    assert checked == 99 and L > 0


def test_weighted_sum_within_the_rounding_bound():
    c = Cohort(range(5))
    vals, w = _vals(range(5)), {i: 10 * (i + 1) for i in range(5)}
    total, _, p = c.round(1, vals, w)
    _within(total, p, vals, w, range(5))


def chi_square_bytes(b: bytes) -> float:
    counts = np.bincount(np.frombuffer(b, np.uint8), minlength=256)
    expected = len(b) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_upload_looks_uniform_and_masks_change_every_round():
    c = Cohort(range(3))
    zeros = {i: np.zeros(20_000, np.float32) for i in range(3)}
    _, up1, _ = c.round(1, zeros, {i: 1 for i in range(3)})
    _, up2, _ = c.round(2, zeros, {i: 1 for i in range(3)})
    for up in (up1[0].masked, up2[0].masked):
        assert chi_square_bytes(up.tobytes()) < 330  # 255 degrees of freedom: the 99.9% quantile is about 330
    assert np.mean(up1[0].masked == up2[0].masked) < 0.001
    assert chi_square_bytes(np.zeros(80_000, np.uint8).tobytes()) > 1e6  # the test can fail


# -- dropouts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["after_sharing", "after_upload"])
def test_dropouts_up_to_tolerance_give_the_survivors_exact_sum(stage):
    c = Cohort(range(7))  # complete graph: 6 neighbours, t = 4
    vals, w = _vals(range(7)), {i: 1 for i in range(7)}
    dropped = set(range(6 - c.params.threshold))  # 2
    kw = {"drop_before_upload": dropped} if stage == "after_sharing" else {"drop_before_unmask": dropped}
    total, ups, p = c.round(1, vals, w, **kw)
    _within(total, p, vals, w, sorted(ups))


@pytest.mark.parametrize("stage", ["after_sharing", "after_upload"])
def test_one_dropout_too_many_fails_the_round_cleanly(stage):
    c = Cohort(range(7))
    vals, w = _vals(range(7), d=16), {i: 1 for i in range(7)}
    dropped = set(range(6 - c.params.threshold + 1))
    kw = {"drop_before_upload": dropped} if stage == "after_sharing" else {"drop_before_unmask": dropped}
    with pytest.raises(sa.SecAggError, match="too many nodes dropped out"):
        c.round(1, vals, w, **kw)


def test_secagg_plus_with_a_sparse_graph_sums_exactly():
    c = Cohort(range(40), degree=8)
    assert all(len(v) == 8 for v in c.params.graph.values())
    vals, w = _vals(range(40), d=32), {i: 3 for i in range(40)}
    total, ups, p = c.round(1, vals, w, drop_before_upload={5, 17})
    _within(total, p, vals, w, sorted(ups))


def test_a_corrupted_share_is_detected_and_other_shares_are_used():
    c = Cohort(range(7))  # t = 4 of 6 neighbours
    vals, w = _vals(range(7), d=16), {i: 1 for i in range(7)}
    p, ups = c.upload(1, vals, w)
    revealed = {h: c.keys[h].reveal(1, rules=RULES, **req) for h, req in c.unmask_requests(p, ups).items()}
    b, s = revealed[3]
    b[0] = b[0][:5] + bytes([b[0][5] ^ 0xFF]) + b[0][6:]  # node 3 returns a corrupted share of node 0's seed
    total = sa.unmask(c.epoch, p, uploads=ups, revealed=revealed)  # 6 shares: a good subset of 4 exists
    _within(total, p, vals, w, range(7))
    only_four = {h: revealed[h] for h in (1, 2, 3, 4)}  # exactly t shares, one corrupted: detected, not summed
    with pytest.raises(sa.SecAggError, match="corrupted share"):
        sa.unmask(c.epoch, p, uploads=ups, revealed=only_four)


# -- replay and tampering --------------------------------------------------------------------------
def test_tampered_replayed_or_redirected_shares_are_rejected():
    c = Cohort(range(4))
    vals, w = _vals(range(4), d=8), {i: 1 for i in range(4)}
    p, ups = c.upload(1, vals, w)
    reqs = c.unmask_requests(p, ups)
    good = reqs[0]["b_shares"][1]
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), reqs[0]["b_shares"][2]):  # tampered; another sender's
        with pytest.raises(sa.SecAggError, match="failed authentication"):
            c.keys[0].reveal(1, rules=RULES, **{**reqs[0], "b_shares": {1: bad}})
    c.round(2, vals, w)
    with pytest.raises(sa.SecAggError, match="stale or replayed"):  # an unmask request for an old round
        c.keys[0].reveal(1, rules=RULES, **reqs[0])


def test_a_round_number_is_masked_only_once():
    """Also the scripted server's replay attack: the same (or an older) round asked for again."""
    c = Cohort(range(3))
    vals, w = _vals(range(3), d=4), {i: 1 for i in range(3)}
    c.upload(3, vals, w)
    with pytest.raises(sa.SecAggError, match="refusing to mask round 3"):
        c.upload(3, vals, w)
    with pytest.raises(sa.SecAggError, match="refusing to mask round 2"):
        c.upload(2, vals, w)


def test_neighbour_graph_is_regular_logarithmic_and_not_the_servers_choice():
    nodes = list(range(100))
    k = sa.default_degree(100)
    g = sa.neighbour_graph(nodes, degree=k, seed=1)
    assert all(len(v) == k for v in g.values()) and k < 30
    assert all(u in g[v] for u in g for v in g[u])  # symmetric
    assert sa.neighbour_graph([1, 2, 3], degree=sa.default_degree(3), seed=0) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}
    a, b = Cohort(range(30), degree=6), Cohort(range(30), degree=6)
    assert a.params.seed != b.params.seed  # fresh keys, fresh graph: derived from every advertised key


# -- a scripted malicious server: every attack is refused by the nodes ------------------------------
def test_attack_lowered_threshold_is_refused():
    params = sa.Params(job="j", epoch=1, cohort=(1, 2, 3, 4, 5, 6), seed=0, degree=5, threshold=2)
    with pytest.raises(sa.ParamsError, match="not a strict majority"):
        sa.NodeKeys.generate(params, node=1, name="a", rules=RULES)
    with pytest.raises(sa.ParamsError, match="below this node's minimum of 4"):
        sa.NodeKeys.generate(dataclasses.replace(params, threshold=3, degree=4), node=1, name="a",
                             rules=sa.NodeRules(min_threshold=4))


def test_attack_server_chosen_graph_is_refused():
    """The server cannot hand a node a neighbourhood of its colluders: nodes compute the graph themselves
    from the cohort and a seed every advertised key determines; another seed is refused."""
    ids = list(range(12))
    params = sa.Params(job="j", epoch=1, cohort=tuple(ids), seed=0, degree=4, threshold=3)
    keys, adverts = {}, {}
    for i in ids:
        keys[i], adverts[i] = sa.NodeKeys.generate(params, node=i, name=f"o{i}", rules=RULES)
    honest = dataclasses.replace(params, seed=sa.graph_seed("j", 1, adverts))
    for seed in range(50):  # the server searches for a seed that surrounds node 0 with nodes 9, 10, 11
        chosen = dataclasses.replace(params, seed=seed)
        if set(chosen.graph[0]) >= {9, 10, 11}:
            break
    with pytest.raises(sa.SecAggError, match="the server may not choose the graph"):
        keys[0].join(chosen, adverts, roster=None)
    keys[0].join(honest, adverts, roster=None)
    assert keys[0].neighbours == honest.graph[0]


def test_attack_small_cohort_is_refused():
    with pytest.raises(sa.ParamsError, match="below this node's minimum of 3"):
        sa.NodeKeys.generate(sa.Params(job="j", epoch=1, cohort=(1, 2), seed=0, degree=1, threshold=1), node=1,
                             name="a", rules=RULES)


def test_attack_claim_drop_then_ask_self_mask_shares_later_in_the_epoch():
    """Round 1: the server claims node 0 dropped (it uploaded) and collects its mask-key shares. Round 2 of
    the same epoch: it wants node 0's self-mask shares too. Nodes that revealed a mask-key share end the
    epoch: none masks round 2, and none reveals a self-mask share of node 0 in this epoch."""
    c = Cohort(range(5))
    vals, w = _vals(range(5), d=8), {i: 1 for i in range(5)}
    p, ups = c.upload(1, vals, w)
    lied = {u: ups[u] for u in ups if u != 0}
    reqs = c.unmask_requests(p, lied)  # survivors 1..4 accept "0 dropped" and sign it (a real dropout looks so)
    for h, req in reqs.items():
        c.keys[h].reveal(1, rules=RULES, **req)
    with pytest.raises(sa.SecAggError, match="the epoch is over for this node"):
        c.upload(2, vals, w)
    # and a node asked for node 0's self-mask share after revealing its mask-key share refuses outright
    c.keys[1].last_round, c.keys[1].round_params = 2, dataclasses.replace(p, round=2)
    with pytest.raises(sa.SecAggError, match="revealed the mask-key share of node"):
        c.keys[1].reveal(2, rules=RULES, uploaded=list(range(5)), signatures={}, survivor_signatures={},
                         b_shares={0: b"x"}, s_shares={})


def test_attack_different_survivor_sets_told_to_different_nodes():
    """The server tells nodes 1, 2 that everyone uploaded (so they reveal node 0's self-mask share) and
    tells nodes 3, 4 that node 0 dropped (so they would reveal its mask key)."""
    c = Cohort(range(5))  # t = 3 of 4
    vals, w = _vals(range(5), d=8), {i: 1 for i in range(5)}
    p, ups = c.upload(1, vals, w)
    full = c.unmask_requests(p, ups)
    for h in (1, 2):
        c.keys[h].reveal(1, rules=RULES, **full[h])  # committed to "everyone uploaded"
    partial = [1, 2, 3, 4]
    # nodes 3 and 4 would sign "0 dropped", but 1 and 2 refuse to sign a set other than the one they accepted
    sigs = {v: c.keys[v].consistency(1, partial) for v in (3, 4)}
    for v in (1, 2):
        with pytest.raises(sa.SecAggError, match="different set of survivors"):
            c.keys[v].consistency(1, partial)
    forged = {**sigs, 1: sigs[3], 2: sigs[4]}  # the server fills in signatures it does not have
    req = {"uploaded": partial, "signatures": {u: ups[u].sig for u in partial}, "survivor_signatures": forged,
           "b_shares": {}, "s_shares": {0: c.epoch.s_shares[3][0]}}
    with pytest.raises(sa.SecAggError, match="did not sign the same survivor set"):
        c.keys[3].reveal(1, rules=RULES, **req)


def test_attack_max_weight_zero_or_different_weights_per_node():
    """max-weight 0 for all but one node would make the 'sum' that node's update: refused outright; giving
    nodes different parameters is caught by their signatures before any share is revealed."""
    c = Cohort(range(4), max_weight=1000)
    with pytest.raises(sa.ParamsError, match="max-weight 0 is outside"):
        c.keys[1].check_round(dataclasses.replace(c.params, round=1, max_weight=0), RULES)
    vals, w = _vals(range(4), d=8), {i: 500 for i in range(4)}
    p = dataclasses.replace(c.params, round=1)
    ups = {}
    for i in range(4):
        pi = p if i == 0 else dataclasses.replace(p, max_weight=1)  # node 0 alone keeps its weight
        out = c.keys[i].mask(pi, vals[i], weight=w[i], rules=RULES)
        ups[i] = sa.Upload(masked=out["masked"], shares=out["shares"], commit=out["commit"], sig=out["sig"])
    reqs = c.unmask_requests(p, ups)
    for h in range(4):
        with pytest.raises(sa.SecAggError, match="did not sign this round's parameters"):
            c.keys[h].reveal(1, rules=RULES, **reqs[h])


def _identity():
    key = ec.generate_private_key(ec.SECP384R1())
    return key, key.public_key()


def test_attack_substituted_public_key_is_refused_with_a_roster():
    ids = [1, 2, 3, 4]
    idents = {i: _identity() for i in ids}
    roster = {f"org-{i}": pub for i, (_, pub) in idents.items()}
    c = Cohort(ids, identities={i: k for i, (k, _) in idents.items()}, roster=roster)  # honest: accepted
    assert c.keys[1].peers[2].identity_sig
    params = sa.Params(job="j", epoch=2, cohort=tuple(ids), seed=0, degree=3, threshold=2)
    keys, adverts = {}, {}
    for i in ids:
        keys[i], adverts[i] = sa.NodeKeys.generate(params, node=i, name=f"org-{i}", rules=RULES,
                                                   identity=idents[i][0])
    # the server replaces node 4's keys with its own (signed by a key that is not in the roster)
    mitm, _ = sa.NodeKeys.generate(params, node=4, name="org-4", rules=RULES, identity=_identity()[0])
    forged = {**adverts, 4: mitm.peers[4]}
    joined = dataclasses.replace(params, seed=sa.graph_seed("j", 2, forged))
    with pytest.raises(sa.SecAggError, match="not signed by a key this organization approved"):
        keys[1].join(joined, forged, roster=roster)
    # without a signature at all, or under a name the roster does not know
    unsigned = {**adverts, 4: dataclasses.replace(adverts[4], identity_sig=b"")}
    with pytest.raises(sa.SecAggError, match="not signed by a key this organization approved"):
        keys[1].join(dataclasses.replace(params, seed=sa.graph_seed("j", 2, unsigned)), unsigned, roster=roster)
    # a node always notices its own keys replaced, roster or not
    mine = {**adverts, 1: sa.Advert(**{**dataclasses.asdict(adverts[2]), "node": 1})}
    with pytest.raises(sa.SecAggError, match="substituted keys"):
        keys[1].join(dataclasses.replace(params, seed=sa.graph_seed("j", 2, mine)), mine, roster=None)


def test_roster_files_from_fedtune_keys_load(tmp_path):
    from fedtune.common.operations import keys as pki

    pki.make_node_keys(tmp_path / "nodes", "org-a")
    roster = sa.load_roster(str(tmp_path / "nodes"))
    key = sa.load_identity_key(str(tmp_path / "nodes" / "org-a.key"))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert set(roster) == {"org-a"} and roster["org-a"].public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) == pub
