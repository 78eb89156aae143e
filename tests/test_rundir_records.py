"""The run directory's records: a round line and the summary, typed, written and read by RunDir alone; old run
directories still read; the run's accountant is the nodes' own."""

from __future__ import annotations

import json
from dataclasses import replace

from fedtune.common.operations.monitoring import node_privacy, run_accountant, run_view, status_table
from fedtune.common.operations.records import EvalFigures, Failure, FederatedEval, NodeFigures, RunPrivacy
from fedtune.common.operations.rundir import RoundRecord, RunDir, RunSummary
from fedtune.common.serving.export import run_record
from fedtune.common.training import adapter
from fedtune.common.training.config import load_config
from fedtune.common.training.wire import NodeRoundResult


def _full_round(k: int = 1) -> RoundRecord:
    """A round with every field set, as server/federation.py builds it."""
    result = NodeRoundResult(update={}, weight=64, epsilon=1.5, max_epsilon=8.0, delta=1e-5, noise_multiplier=0.9,
                             sample_rate=0.05, steps=12)
    fed = FederatedEval(nodes=2, failed=("org-c",), accuracy=0.8, worst_node_accuracy=0.7, worst_node="org-b",
                        fairness={"nodes": 2, "groups": {}},
                        per_node={"11": EvalFigures(name="org-a", epsilon=1.6, noise_std=2.0, accountant="pld",
                                                    correct=9.0, wrong=1.0, accuracy=0.9),
                                  "12": EvalFigures(name="org-b", epsilon=2.1, noise_std=2.0, accountant="pld",
                                                    correct=7.0, wrong=3.0, accuracy=0.7)})
    return RoundRecord(
        round=k, status="ok", reason="", started=1_700_000_000.5, seconds=12.25,
        timing={"train": 8.0, "server_eval": 1.0, "federated_eval_wait": 0.5}, aggregation="secure-fedavg",
        secure_aggregation=True, nodes_connected=4, nodes_asked=3, nodes_replied=2, nodes_benched=("org-d",),
        failures=(Failure(node="org-c", key="13", status="refused", reason="privacy budget exceeded"),
                  Failure(node="org-b", key="12", status="unsafe", reason="replayed", stage="after training")),
        epsilon_per_node={"11": 1.6, "12": 2.1}, epsilon_max=2.1, bytes_sent=1000, bytes_received=2000,
        exchanges=4, server_eval={"val": {"accuracy": 0.8, "loss": 0.5}, "test": {"accuracy": 0.75, "n": 40}},
        server_per_class={"a": {"f1": 0.7}}, federated_eval=fed,
        secagg={"epoch": 1, "cohort": 3, "dropped": []},
        per_node={"11": NodeFigures.of("org-a", "ok", "pld", result.figures()),
                  "12": NodeFigures.of("org-b", "ok", "pld", replace(result, epsilon=2.0).figures()),
                  "13": NodeFigures(name="org-c", status="refused", accountant="pld")})


def test_a_round_record_survives_json_and_the_run_directory(tmp_path):
    rec = _full_round()
    assert RoundRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    rd = RunDir(tmp_path / "run")
    rd.create(config={}, planned_rounds=2, resume=False)
    rd.append_round(rec)
    rd.append_round(replace(rec, round=2, status="failed", reason="too few nodes"))
    assert rd.rounds() == [rec, replace(rec, round=2, status="failed", reason="too few nodes")]
    assert rd.read_run()["completed_rounds"] == 2 and rd.resume_point()[0] == 2
    # the line keeps the keys every earlier reader and the docs name (worst_accuracy, per-node field names)
    line = json.loads(rd.rounds_file.read_text().splitlines()[0])
    assert line["federated_eval"]["worst_accuracy"] == 0.7 and "worst_node_accuracy" not in line["federated_eval"]
    assert line["per_node"]["11"]["max_epsilon"] == 8.0 and line["per_node"]["11"]["accountant"] == "pld"
    assert line["failures"][1] == {"node": "org-b", "key": "12", "status": "unsafe", "reason": "replayed",
                                   "stage": "after training"}
    assert "stage" not in line["failures"][0]


def test_a_summary_survives_json_and_the_run_directory(tmp_path):
    summary = RunSummary(status="finished", rounds_completed=2, rounds_planned=2, rounds_failed=(2,), seconds=20.5,
                         final={"test": {"accuracy": 0.8}}, final_per_class={"a": {"f1": 0.8}},
                         initial={"test": {"accuracy": 0.25}},
                         federated_eval=FederatedEval(nodes=2, accuracy=0.8, worst_node_accuracy=0.7, worst_node="b"),
                         majority_baseline={"accuracy": 0.5}, class_weights=(1.0, 2.0), warnings=("w",),
                         privacy=RunPrivacy(dp=True, mechanism="DP-SGD", accountant="rdp", max_grad_norm=1.0,
                                            target_epsilon=8.0, eval_budget=0.1, secure_aggregation=True,
                                            nodes={"a": {"epsilon": 1.0}}))
    rd = RunDir(tmp_path / "run")
    rd.write_summary(summary)
    assert rd.summary() == summary
    on_disk = json.loads((rd.path / "summary.json").read_text())
    assert on_disk == summary.to_json() and "tuning" not in on_disk and "per_node" not in on_disk["federated_eval"]
    rd.write_summary(replace(summary, tuning={"trials_run": 3}))  # what fedtune tune adds to the chosen run
    assert rd.summary().tuning == {"trials_run": 3} and rd.summary().privacy.accountant == "rdp"
    assert rd.initial() is None
    rd.write_initial({"test": {"accuracy": 0.25}})
    assert rd.initial() == {"test": {"accuracy": 0.25}}


def test_old_round_lines_read():
    """fedtune 0.1: dashed per-node keys, a round-level train_loss, no nodes_connected / timing / failure keys /
    accountants; and the nodes' worst accuracy under either name."""
    old = {"round": 1, "status": "ok", "seconds": 5.0, "nodes_asked": 2, "nodes_replied": 1, "train_loss": 0.7,
           "bytes_received": 10, "failures": [{"node": "b", "status": "error", "reason": "boom"}],
           "federated_eval": {"accuracy": 0.6, "worst_accuracy": 0.5, "per_node": {"a": {"epsilon": 3.0,
                                                                                         "noise-std": 1.5}}},
           "per_node": {"a": {"status": "ok", "epsilon": 2.0, "max-epsilon": 8.0, "noise-multiplier": 0.9,
                              "sample-rate": 0.05, "delta": 1e-5, "steps": 10, "train-loss": 0.5},
                        "b": {"status": "error"}}}
    r = RoundRecord.from_json(old)
    assert (r.round, r.ok, r.nodes_connected, r.timing, r.secagg, r.accountants) == (1, True, None, {}, None, set())
    assert r.per_node["a"].max_epsilon == 8.0 and r.per_node["a"].noise_multiplier == 0.9
    assert r.per_node["a"].name is None and r.per_node["b"].epsilon is None
    assert r.federated_eval.worst_node_accuracy == 0.5 and r.federated_eval.per_node["a"].noise_std == 1.5
    assert r.failures == (Failure(node="b", status="error", reason="boom"),) and r.failures[0].who == "b"
    renamed = {**old, "federated_eval": {"worst_node_accuracy": 0.45}}
    assert RoundRecord.from_json(renamed).federated_eval.worst_node_accuracy == 0.45
    p = node_privacy([r])
    assert p["a"]["epsilon"] == 3.0 and p["a"]["max_epsilon"] == 8.0 and p["a"]["name"] == "a"
    assert p["a"]["evaluations"] == 1 and "accountant" not in p["a"]


def test_a_torn_or_foreign_line_is_skipped(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create(config={}, planned_rounds=2, resume=False)
    rd.append_round(_full_round())
    with open(rd.rounds_file, "a") as f:
        f.write('{"not": "a round"}\n{"round": 2, "stat')
    assert [r.round for r in rd.rounds()] == [1]


def _run_with_accountants(tmp_path, reported: str | None):
    """A deployment whose job says pld; its nodes reported ``reported`` (None: a run of fedtune 0.1)."""
    cfg = load_config({"privacy.accountant": "pld"})
    rd = RunDir(tmp_path / f"run-{reported}")
    rd.create(config=cfg.to_flat(), planned_rounds=1, resume=False, kind="deployment")
    node = NodeFigures(name="org-a", status="ok", accountant=reported, epsilon=2.0, max_epsilon=8.0, delta=1e-5,
                       steps=4)
    rd.append_round(RoundRecord(round=1, nodes_asked=1, nodes_replied=1, per_node={"1": node},
                                epsilon_per_node={"1": 2.0}, epsilon_max=2.0))
    for d in (rd.checkpoint(1), rd.final_adapter):
        d.mkdir(parents=True, exist_ok=True)
        (d / adapter.ADAPTER_FILE).write_bytes(b"")
    # a summary written before summaries recorded the nodes' accountant
    rd.write_summary(RunSummary(status="finished", rounds_completed=1, privacy=RunPrivacy(dp=True)))
    rd.set_status("finished")
    return rd


def test_the_accountant_shown_is_the_one_the_nodes_reported(tmp_path):
    """A deployed node accounting with RDP under a job that says PLD: its epsilons are RDP epsilons. Status, the
    dashboard, the report and the export (round checkpoint and final) said "pld" (the job's) before."""
    rd = _run_with_accountants(tmp_path, "rdp")
    assert run_accountant(rd.rounds(), default="pld") == "rdp"
    view = run_view(rd.path)
    assert view["accountant"] == "rdp"
    assert status_table(view)  # still renders
    assert run_record(rd.path, round=1)["privacy"]["accountant"] == "rdp"
    assert run_record(rd.path)["privacy"]["accountant"] == "rdp"
    assert run_record(rd.path)["privacy"]["nodes"]["participant 1"]["accountant"] == "rdp"
    # two nodes with different accountants: both named
    mixed = replace(rd.rounds()[0], round=2, per_node={"2": NodeFigures(name="org-b", accountant="pld")})
    assert run_accountant([*rd.rounds(), mixed], default="pld") == "pld, rdp"
    assert run_accountant([*rd.rounds(), mixed], upto=1, default="pld") == "rdp"


def test_runs_whose_nodes_reported_no_accountant_show_the_jobs(tmp_path):
    rd = _run_with_accountants(tmp_path, None)
    assert run_view(rd.path)["accountant"] == "pld"
    assert run_record(rd.path, round=1)["privacy"]["accountant"] == "pld"
    assert run_record(rd.path)["privacy"]["accountant"] == "pld"


def test_every_figure_a_node_reports_has_a_place_in_the_round_record():
    """A new figure in NodeRoundResult (common/training/wire.py) needs its field in NodeFigures and its line in
    NodeFigures.from_json: this fails in CI instead of in a server's first round (or a figure written, never read)."""
    from dataclasses import fields

    from fedtune.common.operations.records import NodeFigures
    from fedtune.common.training.wire import NodeRoundResult

    # every figure set to a distinct value, so a figure the reader drops or swaps shows
    values = {f.name: (i + 2 if f.type in ("int | None", int) else 0.5 + i)
              for i, f in enumerate(fields(NodeRoundResult)) if f.name != "update"}
    reported = NodeRoundResult(update={}, **values).figures()
    assert set(reported) <= {f.name for f in fields(NodeFigures)}, set(reported) - {f.name for f in fields(NodeFigures)}
    back = NodeFigures.from_json(NodeFigures.of("org-a", "ok", "pld", reported).to_json())
    assert {k: getattr(back, k) for k in reported} == reported


def test_a_damaged_summary_or_config_is_one_clear_error(tmp_path):
    """Valid JSON that is not what fedtune wrote (a list, a number out of range) ended in AttributeError or
    OverflowError tracebacks in status, export and the dashboard."""
    import pytest
    from fedtune.common.errors import RunDirError
    from fedtune.common.operations.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    with pytest.raises(RunDirError, match="config.json is missing"):
        rd.read_config()
    (rd.path / "config.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="holds no settings"):
        rd.read_config()
    (rd.path / "summary.json").write_text('"finished"')
    with pytest.raises(RunDirError, match="summary.json is damaged"):
        rd.summary()
    rd.rounds_file.write_text('{"round": 1e400}\n{"round": 2, "status": "ok"}\n')
    assert [r.round for r in rd.rounds()] == [2]
