"""The epsilon we report equals an independent recomputation (Google's dp_accounting)."""

from __future__ import annotations

import dp_accounting
import pytest
from conftest import EASY_LABELS, small_config
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants.rdp import RDPAccountant

from common import node, privacy
from common.ledger import PrivacyLedger


def independent_epsilon(history, delta, *, orders=RDPAccountant.DEFAULT_ALPHAS) -> float:
    """Compose the Poisson-subsampled Gaussian releases with dp_accounting's RDP accountant."""
    acc = rdp_privacy_accountant.RdpAccountant(orders=list(orders))
    for sigma, q, steps in history:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def test_epsilon_matches_independent_accountant_and_composes(tmp_path, easy_csv, fresh_easy):
    # Prepare: a real node, two real DP-SGD rounds
    cfg = small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "train.rounds": 2, "train.local-steps": 3})
    n = node.prepare(cfg, state_dir=tmp_path / "state", max_epsilon=20, model=fresh_easy)
    # Execute
    r1 = node.train_round(n, job="j", round=1)
    r2 = node.train_round(n, job="j", round=2)
    reopened = PrivacyLedger(tmp_path / "state", dataset_id=n.splits.dataset_id, n_records=1, max_epsilon=20)
    # Assert: the ledger holds what Opacus' own accountant saw, and its epsilon is recomputable
    entries = reopened.entries
    assert [(e.round, e.steps) for e in entries] == [(1, 3), (2, 3)]
    first = [(entries[0].noise_multiplier, entries[0].sample_rate, entries[0].steps)]
    both = first + [(entries[1].noise_multiplier, entries[1].sample_rate, entries[1].steps)]
    assert r1.epsilon_spent == pytest.approx(independent_epsilon(first, reopened.delta), rel=5e-3)
    assert r2.epsilon_spent == pytest.approx(independent_epsilon(both, reopened.delta), rel=5e-3)
    assert reopened.spent() == pytest.approx(r2.epsilon_spent, rel=1e-9)
    assert r2.epsilon_spent > r1.epsilon_spent  # composition spends more, never resets
    # the whole job was calibrated to its target: both rounds together stay within it
    assert r2.epsilon_spent <= cfg.privacy.target_epsilon + 1e-6
    assert r2.epsilon_spent >= cfg.privacy.target_epsilon - 0.1


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.0213, 141), (1.0, 0.01, 500), (3.0, 0.1, 30)])
def test_calibrated_noise_meets_target(target, q, steps):
    plan = privacy.StepPlan(sample_rate=q, steps_per_round=steps, rounds=1)
    sigma = privacy.calibrate_noise(target_epsilon=target, delta=1e-5, plan=plan, kind="rdp")
    eps = independent_epsilon([(sigma, q, steps)], 1e-5)
    assert target - 0.05 <= eps <= target * 1.005
    # and a tighter independent accountant (PLD) agrees the guarantee holds
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert pld.get_epsilon(1e-5) <= target


def test_impossible_target_is_a_clear_error():
    plan = privacy.StepPlan(sample_rate=1.0, steps_per_round=10**7, rounds=1)
    with pytest.raises(privacy.PrivacyError, match="raise privacy.target-epsilon"):
        privacy.calibrate_noise(target_epsilon=1e-3, delta=1e-9, plan=plan, kind="rdp")


def test_plan_matches_opacus_sample_rate():
    plan = privacy.plan_steps(n_train=1488, batch_size=32, local_epochs=3, local_steps=0, rounds=2)
    assert plan.sample_rate == pytest.approx(1 / 47)  # Opacus: 1 / len(loader) = 1 / ceil(1488/32)
    assert plan.steps_per_round == 141 and plan.total_steps == 282


def test_default_delta_below_one_over_n():
    for n in (10, 1_000, 10**5, 10**7):
        assert privacy.default_delta(n) < 1 / n
