"""Attack: a job of very many near-noiseless releases runs the node's privacy accountant out of memory.

Found by the property-based adversary: a job with train.rounds=10^6 and an evaluation budget made the node
calibrate noise over 10^6 planned evaluation answers, and dp-accounting's PLD of a Gaussian composed 10^6 times
asked for 8 GB (the node process was killed). Now rate-1 Gaussian releases compose in closed form, a history
whose RDP bound is past any ceiling is reported at that bound, and a job plans at most a bounded number of steps.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from fedtune.common.errors import ConfigError, PrivacyError
from fedtune.common.privacy import accounting
from fedtune.common.training import node
from fedtune.common.training.config import MAX_PLANNED_STEPS, MAX_ROUNDS
from helpers import EASY_LABELS, small_config, write_easy_csv


def test_epsilon_of_huge_histories_fits_in_a_small_address_space():
    code = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # torch and numpy alone reserve ~2 GB of it
        from fedtune.common.privacy import accounting as a
        for history in ([(1.0, 1.0, 10**6)], [(0.5, 0.5, 200000)], [(0.05, 0.5, 200000)], [(1.0, 1.0, 10**4),
                        (0.7, 0.5, 3000)]):
            print(a.epsilon(history, delta=1e-5, kind="pld"))
        print(a.calibrate(lambda z: [(z, 0.5, 200000)], target_epsilon=1e6, delta=1e-5, kind="pld"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    values = [float(x) for x in out.stdout.split()]
    assert all(v > 100 for v in values[:4]) and values[4] > 0  # epsilons far past any ceiling: the RDP bound


def test_the_closed_form_gaussian_composition_equals_dp_accountings_self_composition():
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(5.0), 30))
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 50))
    ours = accounting.epsilon([(5.0, 1.0, 10), (5.0, 1.0, 20), (1.0, 0.1, 50)], delta=1e-5, kind="pld")
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


def test_a_job_planning_too_many_steps_is_refused_before_any_accounting(tmp_path, minilm_easy):
    with pytest.raises(ConfigError, match="train.rounds: expected 1..10,000"):
        small_config(**{"train.rounds": MAX_ROUNDS + 1})
    csv = write_easy_csv(tmp_path / "d.csv", n=60)
    cfg = small_config(**{"data.path": str(csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "train.rounds": MAX_ROUNDS, "train.local-steps": 50})
    n = node.prepare(cfg, node.NodePolicy(source="s", max_epsilon=8.0), state_dir=tmp_path / "s", model=minilm_easy)
    with pytest.raises(PrivacyError, match=f"accounts at most {MAX_PLANNED_STEPS:,}"):
        node.train_round(n, job="j", round=1, federated=False)
    assert not n.ledger.entries  # nothing reserved, nothing trained
