"""fedtune tune: a real search through the simulation engine, its privacy cost, the scenario it writes."""

from __future__ import annotations

import json
import math

import pytest
from fedtune.cli import main
from fedtune.common.privacy.accounting import epsilon, search_epsilon
from fedtune.common.privacy.ledger import open_all


def _independent_repeat_and_select(history, mean, delta):
    import dp_accounting
    from dp_accounting import dp_event
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    acc = RdpAccountant()
    one = dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)) if q < 1 else
        dp_accounting.GaussianDpEvent(z), n) for z, q, n in history])
    acc.compose(dp_event.RepeatAndSelectDpEvent(one, mean, math.inf))
    return acc.get_epsilon(delta)


def test_the_search_is_accounted_by_papernot_steinke_or_by_composition():
    history = [(0.9, 0.05, 120), (2.0, 1.0, 3)]  # DP-SGD steps and three noised evaluation answers
    for mean in (2, 8, 20):
        assert search_epsilon(history, delta=1e-5, trials=mean, random_trials=True) == pytest.approx(
            _independent_repeat_and_select(history, mean, 1e-5), rel=1e-9)
    assert search_epsilon(history, delta=1e-5, trials=3, random_trials=False) == pytest.approx(
        epsilon(history * 3, delta=1e-5, kind="pld"))
    # the point of a random number of trials: 20 of them cost far less than 20 composed runs
    assert search_epsilon(history, delta=1e-5, trials=20, random_trials=True) < 0.6 * search_epsilon(
        history, delta=1e-5, trials=20, random_trials=False)
    assert search_epsilon([(0.0, 0.05, 10)], delta=1e-5, trials=2, random_trials=True) == math.inf


@pytest.mark.slow
def test_tune_runs_real_trials_accounts_them_and_writes_a_scenario_simulate_runs(tmp_path, capsys):
    study = tmp_path / "study"
    # a search whose cost would pass the simulated nodes' ceiling is refused after its first trial
    code = main(["tune", "tiny", "--trials", "2", "--fixed-trials", "--study-dir", str(tmp_path / "over"),
                 "sim.node-max-epsilon=9"])
    assert code == 2 and "past its ceiling sim.node-max-epsilon=9" in capsys.readouterr().err
    # Execute: two trials, DP at epsilon 3 each
    assert main(["tune", "tiny", "--trials", "2", "--fixed-trials", "--study-dir", str(study),
                 "privacy.target-epsilon=3"]) == 0
    result = json.loads((study / "tuning.json").read_text())
    # Assert: trial 1 is the scenario's own recipe; privacy-shaping settings were not searched under DP
    assert [t["state"] for t in result["trials"]] == ["complete", "complete"]
    assert result["trials"][0]["default"] and result["trials"][0]["recipe"] == {}
    assert not {"train.batch-size", "train.local-epochs", "train.rounds"} & set(result["trials"][1]["recipe"])
    # the search's cost equals an independent composition of two trials on each node's ledger
    for name, p in result["privacy"]["nodes"].items():
        (ledger,) = open_all(study / "trial-0" / "nodes" / name)
        hist = [e.event for e in ledger.counted]
        assert p["search_epsilon"] == pytest.approx(epsilon(hist * 2, delta=p["delta"], kind="pld"), rel=1e-6)
        assert p["search_epsilon"] <= 10.0 and p["search_epsilon"] > p["one_trial_epsilon"]
    best = json.loads((tmp_path / "study" / f"trial-{result['best']['number']}" / "summary.json").read_text())
    assert best["tuning"]["privacy"]["search_epsilon_max"] == result["privacy"]["search_epsilon_max"]
    assert "Privacy of the search" in (study / "tuning.md").read_text()
    from fedtune.common.serving.export import run_record
    from fedtune.common.serving.modelcard import model_card

    card = model_card(run_record(result["best"]["run_dir"]))
    assert "chosen by a hyperparameter search" in card and f"{result['privacy']['search_epsilon_max']:.3f}" in card
    # the chosen recipe is a scenario `fedtune simulate` runs
    capsys.readouterr()
    assert main(["simulate", str(study / "tuned.toml"), "--run-dir", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["status"] == "finished"
