"""fedtune tune: a real, adaptive search through the simulation engine, its privacy cost, the scenario it writes.

Attack this stops: the search stated a cost from a repeat-and-select theorem whose assumptions it broke (TPE
picks each recipe from earlier scores, the median pruner reads other trials' scores, every trial is kept, a
failed trial's spend was left out, the nodes' ledgers never saw the search). Now every release of every trial
composes in each simulated node's one ledger, and the stated figure is recomputed here independently.
"""

from __future__ import annotations

import json

import pytest
from fedtune.cli import main
from fedtune.common.privacy.ledger import open_all

FAST = ["model.max-length=16", "train.local-steps=1", "data.max-records=150", "fed.node-wait-timeout=120"]


def _independent_epsilon(events, delta):
    """dp-accounting's PLD accountant over the raw events, without fedtune's accounting module."""
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=1e-3)
    for z, q, n in events:
        gauss = dp_accounting.GaussianDpEvent(z)
        acc.compose(dp_accounting.SelfComposedDpEvent(gauss if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gauss),
                                                      n))
    return acc.get_epsilon(delta)


@pytest.mark.slow
def test_an_adaptive_search_states_the_composition_of_every_trial_its_nodes_ledgers_hold(tmp_path, capsys):
    study = tmp_path / "study"
    # Execute: seven trials; TPE proposes trials 4-7 from the scores of the ones before (3 startup trials)
    assert main(["tune", "tiny", "--trials", "7", "--study-dir", str(study), "privacy.target-epsilon=1",
                 "sim.node-max-epsilon=40", *FAST]) == 0
    result = json.loads((study / "tuning.json").read_text())
    trials = result["trials"]
    assert len(trials) == 7 and trials[0]["default"] and trials[0]["recipe"] == {}
    assert sum(t["state"] in ("complete", "pruned") for t in trials) == 7
    assert not {"train.batch-size", "train.local-epochs", "train.rounds"} & {k for t in trials for k in t["recipe"]}
    # Assert: each simulated node's one ledger holds every trial (pruned ones too), and the stated figure is
    # the composition of all of it, recomputed independently
    names = set()
    for node_dir in sorted((study / "nodes").glob("node-*")):
        (ledger,) = open_all(node_dir)
        entries = ledger.counted
        assert {e.job for e in entries} == {f"trial-{t['number']}" for t in trials}
        p = result["privacy"]["nodes"][node_dir.name]
        # (to 1e-4: composing the entries one by one instead of merged discretizes the PLD a little differently)
        assert p["search_epsilon"] == pytest.approx(_independent_epsilon([e.event for e in entries], p["delta"]),
                                                    rel=1e-4)
        assert p["search_epsilon"] == pytest.approx(ledger.spent(), rel=1e-9) and ledger.spent() <= 40
        assert p["search_epsilon"] > 1.5 * p["one_trial_epsilon"]  # seven trials cost more than one
        names.add(node_dir.name)
    assert names == set(result["privacy"]["nodes"]) and len(names) == 3
    assert result["privacy"]["search_epsilon_max"] == max(p["search_epsilon"] for p in result["privacy"]["nodes"].values())
    best = json.loads((study / f"trial-{result['best']['number']}" / "summary.json").read_text())
    assert best["tuning"]["privacy"]["search_epsilon_max"] == result["privacy"]["search_epsilon_max"]
    assert "every trial's releases count in full" in (study / "tuning.md").read_text()
    from fedtune.common.serving.export import run_record
    from fedtune.common.serving.modelcard import model_card

    card = model_card(run_record(result["best"]["run_dir"]))
    assert "chosen by a hyperparameter search" in card and f"{result['privacy']['search_epsilon_max']:.3f}" in card
    # the chosen recipe is a scenario `fedtune simulate` runs
    capsys.readouterr()
    assert main(["simulate", str(study / "tuned.toml"), "--run-dir", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["status"] == "finished"
    # resuming asks for more trials than the ceiling leaves room for: it stops, saying why, and spends nothing more
    spent = {n: lg.spent() for n in names for lg in open_all(study / "nodes" / n)}
    capsys.readouterr()
    assert main(["tune", "tiny", "--trials", "9", "--study-dir", str(study), "privacy.target-epsilon=1",
                 "sim.node-max-epsilon=" + format(max(spent.values()) + 0.01, ".4f"), *FAST]) == 0
    assert "another trial would take" in capsys.readouterr().out
    assert spent == {n: lg.spent() for n in names for lg in open_all(study / "nodes" / n)}


def test_a_head_only_job_searches_head_only_recipes_unless_asked_to_adapt_the_encoder():
    """Head-only trials train on features computed once per study (seconds each); a LoRA trial runs the encoder
    at every step (minutes on a CPU), so a head-only job tries LoRA only with --adapt-encoder."""
    import optuna
    from fedtune.common.training.config import load_config
    from fedtune.simulations.run import read_scenario
    from fedtune.simulations.tune import fixed_keys, suggest

    cfg = load_config(read_scenario("demo"))
    assert cfg.lora.head_only
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kept = fixed_keys(cfg, set())
    recipes = [suggest(study.ask(), cfg, kept) for _ in range(40)]
    assert all("lora.head-only" not in r and "lora.r" not in r for r in recipes)
    assert {r["model.pooling"] for r in recipes} == {"cls", "mean"}  # the head's recipe is still searched
    wide = [suggest(study.ask(), cfg, fixed_keys(cfg, set(), adapt_encoder=True)) for _ in range(40)]
    assert {r.get("lora.head-only") for r in wide} == {True, False}
    lora_job = cfg.replace(**{"lora.head-only": False})
    assert "lora.head-only" not in fixed_keys(lora_job, set())  # a LoRA job may still find the probe better
