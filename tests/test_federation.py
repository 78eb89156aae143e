"""End to end through Flower's simulation engine with the real MiniLM on tiny slices."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from fedtune.common.privacy.ledger import PrivacyLedger
from fedtune.common.training.config import load_config
from fedtune.simulations.run import read_scenario, simulate
from helpers import LORA_RECIPE

ROOT = Path(__file__).resolve().parents[1]

TINY = {**LORA_RECIPE, "data.max-records": 240, "model.max-length": 16, "train.local-steps": 2, "train.batch-size": 8,
        "sim.partitioner": "iid", "fed.node-wait-timeout": 120, "fed.round-timeout": 300}


def _ledger(run_dir: Path, cfg, index: int) -> PrivacyLedger:
    """A simulated organization's ledger: its data source is its partition."""
    return PrivacyLedger(run_dir / "nodes" / f"node-{index}", source=f"simulated-node-{index}", max_epsilon=1e9,
                         accountant=cfg.privacy.accountant)


@pytest.mark.slow
def test_simulation_writes_run_dir_and_skips_a_spent_node(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    # Prepare: 4 organizations; node-2 has already spent its whole budget on its data. With secure
    # aggregation (on by default; 4 nodes: 3 neighbours each, threshold 2) one refusal is tolerated.
    run_dir = tmp_path / "run"
    cfg = load_config({**TINY, "fed.num-nodes": 4, "fed.min-nodes": 3, "train.rounds": 2,
                       "fed.run-dir": str(run_dir), "sim.node-max-epsilon": 8})
    spent = _ledger(run_dir, cfg, 2)
    spent.settle(spent.reserve(job="earlier", round=1, kind="train", noise_multiplier=0.3, sample_rate=0.5, steps=50,
                               fingerprint="earlier", n_records=100))
    assert spent.spent() > 8
    # Execute
    res = simulate(cfg, out=lambda s: None)
    # Assert: every artifact of the run directory
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    # round 1: node-2 refuses (recorded) and the round completes with the other three; it is not asked again
    assert [(f["node"], f["status"]) for f in rounds[0]["failures"]] == [("node-2", "refused")]
    assert "budget exceeded" in rounds[0]["failures"][0]["reason"]
    assert rounds[0]["nodes_asked"] == 4 and rounds[1]["nodes_asked"] == 3 and rounds[1]["nodes_benched"] == ["node-2"]
    for r in rounds:
        assert r["status"] == "ok" and r["nodes_replied"] == 3, r["reason"]
        assert r["bytes_received"] > 0 and r["seconds"] > 0 and r["server_eval"]["val"]["loss"] > 0
        # no node sends its training loss (a function of its records with no noise), nor its training time
        assert all("train_loss" not in m and "seconds" not in m for m in r["per_node"].values())
        assert set(r["epsilon_per_node"]) == {"node-0", "node-1", "node-3"}
        assert r["server_eval"]["test"]["n"] > 0 and r["federated_eval"]["nodes"] == 3
        assert r["federated_eval"]["failed"] == ["node-2"]  # its evaluation answer would pass its ceiling too
        assert r["aggregation"] == "secagg+" and r["secure_aggregation"]
    # round 1: key epoch (2) + train + consistency check (node-2 dropped) + unmask; node-2's mask key was
    # reconstructed and the cohort changed, so round 2 sets up a fresh key epoch among the three
    assert [r["exchanges"] for r in rounds] == [5, 4] and [r["secagg"]["epoch"] for r in rounds] == [1, 2]
    assert [r["secagg"]["dropped"] for r in rounds] == [["node-2"], []]
    assert [r["secagg"]["cohort"] for r in rounds] == [4, 3]
    assert rounds[1]["epsilon_max"] > rounds[0]["epsilon_max"]
    for k in (1, 2):
        assert (run_dir / "checkpoints" / f"round-{k}" / "adapter_model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == res["summary"] and summary["status"] == "finished"
    nodes = summary["privacy"]["nodes"]
    assert set(nodes) == {"node-0", "node-1", "node-3"}
    for name, p in nodes.items():
        assert p["rounds"] == [1, 2] and 0 < p["epsilon"] <= 8 and p["noise_multiplier"] > 0
        assert 0 < p["sample_rate"] < 1 and p["steps"] == 4 and p["delta"] == 1e-5 and p["max_epsilon"] == 8
        assert p["evaluations"] == 2 and p["epsilon"] == pytest.approx(_ledger(run_dir, cfg, int(name[-1])).spent())
    assert json.loads((run_dir / "config.json").read_text())["fed.num-nodes"] == 4
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    report = (run_dir / "report.md").read_text()
    assert "## Rounds" in report and (run_dir / "plots" / "accuracy.png").stat().st_size > 1000
    # the spent node's ledger did not move; the others hold exactly two releases
    assert len(_ledger(run_dir, cfg, 2).entries) == 1
    assert [(e.kind, e.round) for e in _ledger(run_dir, cfg, 0).entries] == [
        ("train", 1), ("eval", 1), ("train", 2), ("eval", 2)]
    # the final adapter loads in stock PEFT and matches the server's final evaluation
    from fedtune.common.training.assets import default_model_dir

    base = AutoModelForSequenceClassification.from_pretrained(str(default_model_dir()), num_labels=5)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n) > 0


@pytest.mark.slow
def test_resume_continues_without_respending(tmp_path):
    from fedtune.common.serving.export import run_record
    from fedtune.common.serving.modelcard import model_card

    run_dir = tmp_path / "run"
    base = {**TINY, "fed.num-nodes": 3, "fed.min-nodes": 3, "fed.run-dir": str(run_dir)}
    cfg1 = load_config({**base, "train.rounds": 2})

    def stop_after_round_1(line: str) -> None:  # the operator's stop request (a STOP file in the run dir)
        if line.startswith("round 1/"):
            (run_dir / "STOP").touch()

    # Execute: the server stops after round 1 of 2 ...
    first = simulate(cfg1, out=stop_after_round_1, report=False)
    assert first["summary"]["status"] == "stopped" and first["summary"]["rounds_completed"] == 1
    eps_after_1 = [_ledger(run_dir, cfg1, i).spent() for i in range(3)]
    # ... and is resumed with the same settings
    res = simulate(cfg1.replace(**{"fed.resume": True}), out=lambda s: None, report=False)
    # Assert
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert res["summary"]["rounds_completed"] == 2 and res["summary"]["status"] == "finished"
    assert not (run_dir / "STOP").exists()
    for i in range(3):
        entries = _ledger(run_dir, cfg1, i).entries
        assert [(e.kind, e.round) for e in entries] == [("train", 1), ("eval", 1), ("train", 2), ("eval", 2)]
        assert entries[1].epsilon_after == pytest.approx(eps_after_1[i])  # round 1 was not spent again
    # summary.json and the model card carry each node's whole history, rounds before the resume included
    summary_nodes = res["summary"]["privacy"]["nodes"]
    card_nodes = run_record(run_dir, name_nodes=True)["privacy"]["nodes"]
    card = model_card(run_record(run_dir, name_nodes=True))
    for i in range(3):
        ledger = _ledger(run_dir, cfg1, i)
        train = [e for e in ledger.counted if e.kind == "train"]
        for nodes in (summary_nodes, card_nodes):
            p = nodes[f"node-{i}"]
            assert p["rounds"] == [1, 2] and p["steps"] == sum(e.steps for e in train) == 4
            assert p["noise_multiplier"] == train[-1].noise_multiplier and p["delta"] == ledger.delta
            assert p["epsilon"] == pytest.approx(ledger.spent()) and p["evaluations"] == 2
        assert f"| node-{i} | {ledger.spent():.4f} |" in card


def test_resume_refuses_changed_settings(tmp_path):
    from fedtune.common.operations.rundir import RunDir, RunDirError

    rd = RunDir(tmp_path / "r")
    rd.create(config={"a": 1, "train.rounds": 2}, planned_rounds=2, resume=False)
    with pytest.raises(RunDirError, match="already holds a run"):
        rd.create(config={"a": 1}, planned_rounds=2, resume=False)
    with pytest.raises(RunDirError, match="settings differ"):
        rd.create(config={"a": 2, "train.rounds": 3}, planned_rounds=3, resume=True)
    rd.create(config={"a": 1, "train.rounds": 3}, planned_rounds=3, resume=True)  # more rounds is fine


def _toml_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, (int, float)) else json.dumps(v)


def test_flower_app_config_is_the_defaults():
    """`flwr run .` trains the default recipe: pyproject's run config lists every setting (Flower accepts
    --run-config overrides only for listed keys) with exactly the dataclass defaults, the one place they live."""
    from fedtune.common.training.config import JobConfig

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = py["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"}
    expected = JobConfig().to_flat()
    table = "[tool.flwr.app.config]\n" + "\n".join(f'"{k}" = {_toml_value(v)}' for k, v in expected.items())
    assert app["config"] == expected, f"pyproject.toml's run config is not the defaults; replace it with:\n{table}"


def test_local_simulate_flower_and_demo_train_one_recipe(tmp_path):
    """Before, `fedtune local` and a scenario-less `fedtune simulate` trained AdamW LoRA while `flwr run .` and the
    demo trained a head-only SGD probe: the defaults lived in three places that disagreed."""
    from fedtune.cli.main import build_parser
    from fedtune.cli.node import _job_config
    from fedtune.cli.simulate import _sim_config
    from fedtune.common.training.config import JobConfig

    parser = build_parser()
    local = _job_config(parser.parse_args(["local"]))
    simulate_ = _sim_config(parser.parse_args(["simulate"]), None)
    demo = _sim_config(parser.parse_args(["demo"]), "demo")
    flower = load_config(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert local == simulate_ == demo == flower == JobConfig()
    recipe = JobConfig()
    assert (recipe.lora.head_only, recipe.model.pooling, recipe.train.optimizer, recipe.train.lr,
            recipe.train.batch_size, recipe.train.local_epochs, recipe.privacy.max_grad_norm,
            recipe.train.rounds, recipe.fed.min_nodes) == (True, "mean", "sgd", 20.0, 128, 3.0, 0.5, 6, 3)
    # every scenario holds only what differs from the defaults (the demo: nothing)
    for path in sorted((ROOT / "simulations" / "scenarios").glob("*.toml")):
        flat = read_scenario(path)
        cfg = load_config(flat)
        same = [k for k, v in flat.items() if load_config({k2: v2 for k2, v2 in flat.items() if k2 != k}) == cfg]
        assert not same, f"{path.name} repeats defaults: {same}"
    # a causal LM has no head to probe: its unset settings take the LoRA recipe, what the job gives wins
    lm = load_config({"model.task": "causal-lm"})
    assert (lm.lora.head_only, lm.lora.ffa, lm.model.pooling, lm.train.optimizer, lm.train.lr) == (
        False, False, "cls", "adamw", 3e-3)
    assert load_config({"model.task": "causal-lm", "train.lr": 0.5}).train.lr == 0.5
    # ... also through `flwr run`, whose run config is pyproject's whole table (the defaults) plus the overrides
    from fedtune.common.training.config import from_run_config

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert load_config(from_run_config({**table, "model.task": "causal-lm"})) == lm
    assert load_config(from_run_config({**table, "train.rounds": 2})) == JobConfig().replace(**{"train.rounds": 2})


@pytest.mark.slow
def test_secure_aggregation_matches_plain_fedavg(tmp_path, capfd):
    """Same job with and without secure aggregation (DP off, so training is deterministic), 3 of 5 nodes sampled
    per round: the two runs sample the same cohorts (by partition name; Flower draws fresh node ids each run,
    which used to give each run its own cohorts) and end with the same model within quantization.

    Also: each privacy-weakening warning reaches the user once per run, not once per node and round."""
    from fedtune.common.training.adapter import read_adapter_file

    base = {**TINY, "fed.num-nodes": 5, "fed.min-nodes": 3, "fed.fraction-train": 0.6, "train.rounds": 2,
            "privacy.enabled": False,
            "sim.node-max-epsilon": float("inf"), "fed.fraction-evaluate": 0, "fed.secagg-max-weight": 1000,
            "train.optimizer": "sgd", "train.lr": 0.5,  # SGD: Adam would amplify rounding differences
            "train.seed": 4}  # seed 4 samples the same 3 of 5 nodes in rounds 1 and 2: the key epoch is reused
    results = {}
    for secure in (True, False):
        run_dir = tmp_path / ("secure" if secure else "plain")
        cfg = load_config({**base, "fed.secure-aggregation": secure, "fed.run-dir": str(run_dir)})
        lines: list[str] = []
        simulate(cfg, out=lines.append, report=False)
        captured = capfd.readouterr()
        said = "\n".join(lines) + captured.out + captured.err
        assert said.count("DIFFERENTIAL PRIVACY IS OFF") == 1, said
        assert said.count("SECURE AGGREGATION IS OFF") == (0 if secure else 1), said
        assert "run_simulation` function is deprecated" not in said
        results[secure] = read_adapter_file(run_dir / "adapter")
        results[(secure, 1)] = read_adapter_file(run_dir / "checkpoints" / "round-1")
        rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert all(r["status"] == "ok" and r["nodes_replied"] == 3 for r in rounds)
        results[(secure, "benched")] = [r["nodes_benched"] for r in rounds]
        assert rounds[0]["aggregation"] == ("secagg+" if secure else "fedavg")
        if secure:  # key set-up once per cohort, then one extra exchange per round
            assert [r["exchanges"] for r in rounds] == [4] + [
                2 if r["nodes_benched"] == prev["nodes_benched"] else 4 for prev, r in zip(rounds, rounds[1:])]
            assert [r["exchanges"] for r in rounds] == [4, 2]  # the reuse path runs (not only new epochs)
    assert results[(True, "benched")] == results[(False, "benched")]  # the same cohorts, round by round
    assert all(len(b) == 2 and all(n.startswith("node-") for n in b) for b in results[(True, "benched")])
    # quantization step: clip / L with L = (2^31 - 1) // (3 nodes * 1000); errors of both rounds add up
    step = 1.0 / ((2**31 - 1) // 3000)
    first = max(float(abs(results[(True, 1)][k] - results[(False, 1)][k]).max()) for k in results[False])
    assert first <= step * 1.01  # one aggregation: within one quantization step per coordinate
    diffs = {k: float(abs(results[True][k] - results[False][k]).max()) for k in results[False]}
    moved = {k: float(abs(results[False][k]).max()) for k in results[False] if "lora_B" in k}
    assert max(moved.values()) > 1e-3  # training really changed B, so the comparison means something
    assert max(diffs.values()) <= 4 * step, max(diffs.items(), key=lambda kv: kv[1])


@pytest.mark.slow
def test_sampled_cohorts_with_a_sparse_graph_equal_plain_fedavg_of_the_same_nodes(tmp_path, minilm_bbc):
    """60 organizations, 10% sampled per round, a sparse neighbour graph (4 of 5 possible neighbours): each
    round's secure result equals plain FedAvg over exactly the nodes that round sampled, recomputed here
    from the same starting adapter with the same (deterministic, DP-free) local training."""
    import copy

    import numpy as np
    import torch
    from fedtune.common.secagg import protocol as secagg
    from fedtune.common.training import adapter
    from fedtune.common.training.aggregate import batch_weight, fedavg, update
    from fedtune.common.training.federated_data import node_splits
    from fedtune.common.training.node import NodePolicy, prepare, train_round

    run_dir = tmp_path / "run"
    cfg = load_config({**TINY, "data.max-records": 1200, "train.batch-size": 4, "train.local-steps": 1,
                       "fed.num-nodes": 60, "fed.fraction-train": 0.1, "fed.min-nodes": 3, "fed.secagg-degree": 4,
                       "fed.fraction-evaluate": 0, "train.rounds": 3, "privacy.enabled": False,
                       "sim.node-max-epsilon": float("inf"), "train.optimizer": "sgd", "train.lr": 0.5,
                       "fed.secagg-max-weight": 1000, "fed.run-dir": str(run_dir), "train.threads": 1})
    simulate(cfg, out=lambda s: None, report=False)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds] == ["ok"] * 3, [r["reason"] for r in rounds]
    step = 1.0 / secagg.levels(n_nodes=6, max_weight=1000)
    threads = torch.get_num_threads()
    lm = copy.deepcopy(minilm_bbc)
    try:
        start = adapter.pack(lm.model, ffa=False)
        cohorts = []
        for r in rounds:
            sampled = sorted(int(k.split("-")[1]) for k, m in r["per_node"].items() if m["status"] == "ok")
            assert len(sampled) == 6 and r["secagg"]["cohort"] == 6 and r["secagg"]["degree"] == 4
            cohorts.append(tuple(sampled))
            updates, weights = [], []
            for pid in sampled:
                splits = node_splits(cfg, pid, 60)
                node = prepare(cfg, NodePolicy(source=f"ref-{pid}", max_epsilon=float("inf")),
                               state_dir=tmp_path / "ref" / str(pid), model=lm, splits=splits)
                trained = train_round(node, job="ref", round=r["round"], initial=start, federated=False)
                updates.append(update(trained.arrays, start))
                weights.append(batch_weight(splits.planned_train, 4))  # the one weight rule: the planned size
            plain = fedavg(start, updates, weights)
            secure = adapter.read_adapter_file(run_dir / "checkpoints" / f"round-{r['round']}")
            moved = max(float(np.abs(plain[k] - start[k]).max()) for k in plain)
            diff = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
            assert moved > 100 * step and diff <= 2 * step, (r["round"], diff, moved, step)
            start = {k: secure[k] for k in start}
        assert len(set(cohorts)) == 3  # three different samples, each with its own key epoch
        assert [r["secagg"]["epoch"] for r in rounds] == [1, 2, 3] and [r["exchanges"] for r in rounds] == [4, 4, 4]
    finally:
        torch.set_num_threads(threads)
