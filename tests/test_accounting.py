"""The epsilon we report equals an independent recomputation (Google's dp_accounting), in both directions."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from fedtune.common.privacy import accounting as privacy
from fedtune.common.privacy.ledger import PrivacyLedger
from fedtune.common.training import node
from helpers import EASY_LABELS, small_config
from opacus.accountants.rdp import RDPAccountant


def _calibrate_noise(*, target_epsilon, delta, plan, kind) -> float:
    """The noise multiplier meeting the target over one job's whole plan (no other releases)."""
    return privacy.calibrate(lambda z: [(z, plan.sample_rate, plan.total_steps)], target_epsilon=target_epsilon,
                             delta=delta, kind=kind)


def _event(sigma: float, q: float, steps: int):
    gauss = dp_accounting.GaussianDpEvent(sigma)
    return dp_accounting.SelfComposedDpEvent(gauss if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gauss), steps)


def independent_pld(history, delta) -> float:
    """Compose the releases one by one with dp_accounting's PLD accountant at its own (finer) discretization."""
    acc = pld_privacy_accountant.PLDAccountant()
    for sigma, q, steps in history:
        acc.compose(_event(sigma, q, steps))
    return acc.get_epsilon(delta)


def independent_rdp(history, delta, *, orders=RDPAccountant.DEFAULT_ALPHAS) -> float:
    acc = rdp_privacy_accountant.RdpAccountant(orders=list(orders))
    for sigma, q, steps in history:
        acc.compose(_event(sigma, q, steps))
    return acc.get_epsilon(delta)


def test_ledger_epsilon_matches_an_independent_pld_recomputation(tmp_path, easy_csv, fresh_easy):
    # Prepare: a real node, two real DP-SGD rounds and a noised evaluation answer (the default accountant: PLD)
    cfg = small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "train.rounds": 2, "train.local-steps": 3})
    policy = node.NodePolicy(source="easy", max_epsilon=20)
    n = node.prepare(cfg, policy, state_dir=tmp_path / "state", model=fresh_easy)
    # Execute
    r1 = node.train_round(n, job="j", round=1)
    answer = node.answer_evaluation(n, job="j", round=1)
    r2 = node.train_round(n, job="j", round=2)
    # Assert: every epsilon the ledger reported is within 2% of dp_accounting's PLD on the ledger's own figures
    entries = PrivacyLedger(tmp_path / "state", source="easy", max_epsilon=20).counted
    assert [(e.kind, e.round) for e in entries] == [("train", 1), ("eval", 1), ("train", 2)]
    for i, e in enumerate(entries):
        expected = independent_pld([x.event for x in entries[: i + 1]], policy.delta)
        assert e.epsilon_after == pytest.approx(expected, rel=0.02), (i, e.epsilon_after, expected)
    assert (r1.epsilon_spent, answer.epsilon, r2.epsilon_spent) == tuple(e.epsilon_after for e in entries)
    assert r1.epsilon_spent < answer.epsilon < r2.epsilon_spent  # composition spends more, never resets
    # the whole job (2 rounds + 2 planned evaluation answers) was calibrated to its target
    jp = node.job_plan(n, "j")
    planned = [(jp.noise_multiplier, n.plan.sample_rate, n.plan.total_steps), (jp.eval_noise, 1.0, jp.evaluations)]
    assert cfg.privacy.target_epsilon - 0.05 <= independent_pld(planned, policy.delta) <= cfg.privacy.target_epsilon


def test_rdp_stays_selectable_and_matches_dp_accounting_rdp(tmp_path, easy_csv, fresh_easy):
    cfg = small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "train.rounds": 2, "train.local-steps": 3})
    policy = node.NodePolicy(source="easy", max_epsilon=20, accountant="rdp")
    n = node.prepare(cfg, policy, state_dir=tmp_path, model=fresh_easy)
    r = node.train_round(n, job="j", round=1, federated=False)
    e = PrivacyLedger(tmp_path, source="easy", max_epsilon=20, accountant="rdp").counted[0]
    assert r.epsilon_spent == pytest.approx(independent_rdp([e.event], policy.delta), rel=5e-3)


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.0213, 141), (1.0, 0.01, 500), (3.0, 0.1, 30), (8.0, 1 / 15, 90)])
def test_calibrated_noise_meets_target_and_pld_needs_less_noise_than_rdp(target, q, steps):
    plan = privacy.StepPlan(sample_rate=q, steps_per_round=steps, rounds=1)
    pld = _calibrate_noise(target_epsilon=target, delta=1e-5, plan=plan, kind="pld")
    rdp = _calibrate_noise(target_epsilon=target, delta=1e-5, plan=plan, kind="rdp")
    assert target * 0.98 <= independent_pld([(pld, q, steps)], 1e-5) <= target * 1.001
    assert target - 0.05 <= independent_rdp([(rdp, q, steps)], 1e-5) <= target * 1.005
    assert pld < rdp  # the tight accountant gives the same guarantee with less noise


def test_heterogeneous_histories_compose_like_dp_accounting():
    # different noise, sample rates and step counts across jobs, plus evaluation answers (rate 1)
    history = [(0.8, 1 / 15, 90), (1.2, 0.02, 300), (11.0, 1.0, 6), (0.7, 0.05, 40)]
    for i in range(1, len(history) + 1):
        ours = privacy.epsilon(history[:i], delta=1e-5, kind="pld")
        assert ours == pytest.approx(independent_pld(history[:i], 1e-5), rel=0.02)
        assert ours >= independent_pld(history[:i], 1e-5) * 0.999  # never optimistic beyond rounding


def test_impossible_target_is_a_clear_error():
    plan = privacy.StepPlan(sample_rate=1.0, steps_per_round=10**7, rounds=1)
    with pytest.raises(privacy.PrivacyError, match="raise privacy.target-epsilon"):
        _calibrate_noise(target_epsilon=1e-3, delta=1e-9, plan=plan, kind="rdp")


def test_plan_matches_opacus_sample_rate():
    plan = privacy.plan_steps(n_train=1488, batch_size=32, local_epochs=3, local_steps=0, rounds=2)
    assert plan.sample_rate == pytest.approx(1 / 47)  # Opacus: 1 / len(loader) = 1 / ceil(1488/32)
    assert plan.steps_per_round == 141 and plan.total_steps == 282


def test_suggested_delta_is_round_and_below_one_over_n():
    for n in (10, 1_000, 10**5, 10**7, 3 * 10**7):
        d = privacy.suggested_delta(n)
        assert d < 1 / n and d <= 1e-5 and f"{d:g}".startswith("1e-")
    with pytest.raises(privacy.PrivacyError, match="set delta=1e-07"):
        privacy.check_delta(1e-5, 200_000, where="x")
