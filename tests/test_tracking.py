"""Experiment tracking (``fed.tracking``, common/operations/tracking.py): what MLflow and TensorBoard hold, read back
with each library's own reader, is what ``rounds.jsonl`` holds, and nothing beyond the server's figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.common.operations import tracking
from fedtune.common.operations.records import FederatedEval, NodeFigures, RoundRecord, RunPrivacy, RunSummary
from fedtune.common.operations.rundir import RunDir
from fedtune.common.training.config import load_config

# the tracking extra's packages are in the test extra: a missing one fails here, it is not skipped
import mlflow  # noqa: E402,F401
import tensorboard  # noqa: E402,F401

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

# every figure a round logs, as the test spells it from the record (not from tracking.round_metrics)
ROUND_FIGURES = {"epsilon_max", "round/ok", "round/seconds", "round/bytes_sent", "round/bytes_received",
                 "round/nodes_asked", "round/nodes_replied"}


def expected(rec: RoundRecord) -> dict[str, float]:
    """The server's figures of one round, from its record's attributes."""
    out = {f"{split}/{k}": v for split, ev in (("val", rec.server_val), ("test", rec.server_test))
           for k, v in ev.items() if k in ("accuracy", "macro_f1", "loss", "perplexity", "rouge_l")}
    fe = rec.federated_eval
    if fe is not None:
        out.update({k: v for k, v in (("nodes/accuracy", fe.accuracy), ("nodes/worst_accuracy", fe.worst_node_accuracy),
                                      ("nodes/loss", fe.loss)) if v is not None})
    out.update({f"epsilon/{n.replace('/', '_')}": e for n, e in rec.epsilon_per_node.items() if e is not None})
    out.update({"epsilon_max": rec.epsilon_max, "round/ok": 1.0 if rec.ok else 0.0, "round/seconds": rec.seconds,
                "round/bytes_sent": rec.bytes_sent, "round/bytes_received": rec.bytes_received,
                "round/nodes_asked": rec.nodes_asked, "round/nodes_replied": rec.nodes_replied})
    return {k: float(v) for k, v in out.items() if v is not None}


def record(k: int, *, ok: bool = True) -> RoundRecord:
    """A round as the server records it: its own evaluation, pooled noised answers, per-node figures."""
    return RoundRecord(
        round=k, status="ok" if ok else "failed", started=1.8e9 + 60 * k, seconds=10.5 + k, nodes_asked=3,
        nodes_replied=3 if ok else 1, bytes_sent=1000 * k, bytes_received=2000 * k,
        server_eval={"val": {"accuracy": 0.5 + k / 100, "macro_f1": 0.4 + k / 100, "loss": 1.0 / k, "n": 40,
                             "fairness": {"accuracy_gap": 0.1}},
                     "test": {"accuracy": 0.123456789 * k, "macro_f1": 0.3 + k / 100, "loss": 2.0 / k, "n": 80}},
        federated_eval=FederatedEval(nodes=3, accuracy=0.6 + k / 100, worst_node_accuracy=0.55, worst_node="node-1"),
        epsilon_per_node={"node-0": 1.1 * k, "node-1": 1.2 * k, "node 2/x": 1.3 * k},
        epsilon_max=1.3 * k,
        per_node={"node-0": NodeFigures(name="node-0", weight=640, epsilon=1.1 * k, max_epsilon=8.0, delta=1e-5,
                                        noise_multiplier=1.7, sample_rate=0.2, steps=12)},
    )


def summary(rounds: int) -> RunSummary:
    return RunSummary(status="finished", rounds_completed=rounds, seconds=42.0,
                      final={"val": {"accuracy": 0.61, "macro_f1": 0.6}, "test": {"accuracy": 0.62, "macro_f1": 0.59}},
                      privacy=RunPrivacy(dp=True, nodes={"node-0": {"epsilon": 3.3, "steps": 36, "rounds": [1, 2, 3]}}))


def flat(**extra) -> dict:
    return {**load_config({}).to_flat(), "fed.tracking": "mlflow,tensorboard", **extra}


def new_run(path: Path, settings: dict) -> RunDir:
    rd = RunDir(path)
    rd.create(config=settings, planned_rounds=3, resume=False, kind="simulation")
    return rd


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow SQLite store for the module's fast tests (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def mlflow_run(uri: str, run_dir: Path, experiment: str = tracking.DEFAULT_EXPERIMENT):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`fedtune.run_key` = '{tracking.run_key(run_dir)}'")
    assert len(runs) == 1
    return client, runs[0]


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run's event files, read with TensorBoard's own event reader."""
    ea = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    ea.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in ea.Tensors(tag)]
            for tag in ea.Tags()["tensors"] if not tag.startswith("_hparams_")}


def assert_logged_as_recorded(rd: RunDir, client, run, scalars: dict) -> None:
    """Every round figure in MLflow and TensorBoard, at its round, equal to rounds.jsonl's; no other per-round key."""
    rounds = rd.rounds()
    assert rounds
    per_round: dict[str, list[tuple[int, float]]] = {}
    for rec in rounds:
        for k, v in expected(rec).items():
            per_round.setdefault(k, []).append((rec.round, v))
    mlflow_keys = {k for k in run.data.metrics if not k.startswith("final/")}
    assert mlflow_keys == set(per_round)
    assert {k for k in scalars if not k.startswith("final/")} == set(per_round)
    for k, want in per_round.items():
        got = [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
        assert got == want, k
        assert scalars[k] == [(s, float(np.float32(v))) for s, v in want], k  # event files hold float32


def test_round_metrics_are_the_servers_figures_only():
    rec = record(2)
    got = tracking.round_metrics(rec)
    assert got == expected(rec)
    assert "epsilon/node 2_x" in got  # a node's key is any string: one part of the name, "/" replaced
    # nothing a node alone knows or that describes its data: no update, weight, noise, steps, losses of its own
    assert not [k for k in got if any(w in k for w in ("weight", "noise", "sample", "steps", "train_loss", "delta"))]
    assert set(got) == ROUND_FIGURES | {"val/accuracy", "val/macro_f1", "val/loss", "test/accuracy", "test/macro_f1",
                                        "test/loss", "nodes/accuracy", "nodes/worst_accuracy", "epsilon/node-0",
                                        "epsilon/node-1", "epsilon/node 2_x"}


def test_mlflow_and_tensorboard_hold_what_rounds_jsonl_holds(tmp_path, store):
    settings = flat(**{"fed.tracking-uri": store})
    rd = new_run(tmp_path / "run", settings)
    (rd.final_adapter).mkdir()
    (rd.final_adapter / "adapter_config.json").write_text("{}")
    t = tracking.Tracker(settings, rd.path, out=lambda s: None)
    t.start(kind="simulation")
    for k in (1, 2, 3):
        rec = record(k, ok=k != 2)
        rd.append_round(rec)
        t.log_round(rec)
    rd.write_summary(summary(3))
    t.finish(summary(3), status="finished")

    client, run = mlflow_run(store, rd.path)
    scalars = tensorboard_scalars(rd.tensorboard_dir)
    assert_logged_as_recorded(rd, client, run, scalars)
    # the settings (params), and only fedtune's tags besides MLflow's own
    assert run.data.params == {k: str(v) for k, v in settings.items()}
    assert set(run.data.tags) == {"fedtune.run_key", "fedtune.kind", "fedtune.run_dir", "fedtune.status",
                                  "mlflow.runName"}  # no user, host or source file
    assert run.data.tags["mlflow.runName"] == "run" and run.data.tags["fedtune.kind"] == "simulation"
    assert run.info.status == "FINISHED"
    # the end: the final figures, summary.json and the adapter as artifacts
    assert run.data.metrics["final/test/accuracy"] == 0.62 and run.data.metrics["final/epsilon/node-0"] == 3.3
    assert scalars["final/test/accuracy"] == [(3, float(np.float32(0.62)))]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json", "adapter"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapter")] == ["adapter/adapter_config.json"]
    # the job's settings in TensorBoard's HParams dashboard
    ea = EventAccumulator(str(rd.tensorboard_dir))
    ea.Reload()
    assert "_hparams_/session_start_info" in ea.Tags()["tensors"]


def test_a_resumed_run_continues_its_tracked_run_and_catches_up(tmp_path, store):
    settings = flat(**{"fed.tracking-uri": store})
    rd = new_run(tmp_path / "run", settings)
    t = tracking.Tracker(settings, rd.path, out=lambda s: None)
    t.start(kind="deployment")
    rd.append_round(record(1))
    t.log_round(record(1))
    rd.append_round(record(2))  # the server stopped after writing round 2's line, before logging it
    t.fail()
    _, run = mlflow_run(store, rd.path)
    assert run.info.status == "FAILED"

    resumed = {**settings, "fed.resume": True, "train.rounds": 9}
    again = tracking.Tracker(resumed, rd.path, out=lambda s: None)
    again.start(kind="deployment", rounds=rd.rounds())  # logs round 2, not round 1 again
    rd.append_round(record(3))
    again.log_round(record(3))
    again.finish(summary(3), status="finished")

    client, run = mlflow_run(store, rd.path)  # the same MLflow run, not a second one
    assert run.info.status == "FINISHED"
    assert run.data.params["train.rounds"] == str(settings["train.rounds"])  # as first logged (params are fixed)
    assert_logged_as_recorded(rd, client, run, tensorboard_scalars(rd.tensorboard_dir))


def test_tracking_settings_may_change_on_resume(tmp_path):
    rd = new_run(tmp_path / "run", load_config({}).to_flat())
    rd.create(config=flat(**{"fed.resume": True}), planned_rounds=3, resume=True)  # turned on for the rest of the run


def test_report_and_baselines_join_the_run(tmp_path, store):
    settings = flat(**{"fed.tracking": "mlflow", "fed.tracking-uri": store, "fed.tracking-experiment": "demo"})
    rd = new_run(tmp_path / "run", settings)
    t = tracking.Tracker(settings, rd.path, out=lambda s: None)
    t.start(kind="simulation")
    t.finish(summary(0), status="finished")
    (rd.path / "report.md").write_text("# report\n")
    (rd.path / "plots").mkdir()
    (rd.path / "plots" / "accuracy.png").write_bytes(b"png")
    rows = [{"name": "federated, DP (this run)", "accuracy": 0.6, "epsilon": 3.0},
            {"name": "centralized, DP", "accuracy": 0.7, "macro_f1": 0.69, "epsilon": 3.0, "seconds": 5.0, "steps": 9},
            {"name": "local only", "error": "no node could train alone"}]
    (rd.path / "baselines.json").write_text(json.dumps(rows))
    tracking.log_report(settings, rd.path)
    children = tracking.log_baselines(settings, rd.path, rows)

    client, run = mlflow_run(store, rd.path, "demo")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.md", "plots", "baselines.json"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/accuracy.png"]
    assert len(children) == 2  # the federated row is this run itself
    central, local = (client.get_run(i) for i in children)
    assert central.data.tags["mlflow.parentRunId"] == run.info.run_id and central.info.run_name == "centralized, DP"
    assert central.data.metrics == {"accuracy": 0.7, "macro_f1": 0.69, "epsilon": 3.0, "seconds": 5.0, "steps": 9.0}
    assert local.info.status == "FAILED" and local.data.tags["fedtune.error"] == "no node could train alone"


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(tmp_path, store):
    settings = flat(**{"fed.tracking": "mlflow", "fed.tracking-uri": store})
    rd = new_run(tmp_path / "run", settings)
    said: list[str] = []
    t = tracking.Tracker(settings, rd.path, out=said.append)
    t.start(kind="simulation")

    calls = []

    def down(rec):
        calls.append(rec.round)
        raise ConnectionError("tracking server unreachable")

    t.mlflow.log_round = down
    t.log_round(record(1))
    t.log_round(record(2))
    t.finish(RunSummary(status="finished"), status="finished")
    warnings = [s for s in said if s.startswith("WARNING")]
    assert len(warnings) == 1 and "mlflow could not log round 1" in warnings[0] and "unreachable" in warnings[0]
    # off after its first failure: a dead tracking server is not retried (and waited for) every round
    assert calls == [1] and t.mlflow is None


def test_tracking_after_the_run_warns_and_never_fails_the_command(tmp_path, store, capsys, monkeypatch):
    settings = flat(**{"fed.tracking": "mlflow", "fed.tracking-uri": store})
    rd = new_run(tmp_path / "run", settings)

    def down(*a, **k):
        raise PermissionError("artifact store read-only")

    monkeypatch.setattr(tracking, "_run_of", down)
    tracking.log_report(settings, rd.path)
    assert tracking.log_baselines(settings, rd.path, [{"name": "centralized, DP", "accuracy": 0.9}]) == []
    out = capsys.readouterr().out
    assert out.count("WARNING: tracking: MLflow could not log") == 2 and "read-only" in out


@pytest.mark.parametrize("name", ["mlflow", "tensorboard"])
def test_a_missing_library_is_one_clear_error_before_the_run(tmp_path, monkeypatch, name):
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(FedtuneError) as e:
        tracking.Tracker({"fed.tracking": name}, tmp_path / "run")
    assert f"fed.tracking names {name}, which is not installed" in e.value.problem
    assert 'pip install -e ".[tracking]"' in e.value.fix
    assert not (tmp_path / "run").exists()
    # a simulation says so before it starts any node
    from fedtune.simulations.run import simulate

    cfg = load_config({"fed.tracking": name, "fed.run-dir": str(tmp_path / "sim"), "data.max-records": 120,
                       "train.batch-size": 8, "sim.partitioner": "iid", "fed.num-nodes": 3})
    with pytest.raises(FedtuneError, match="which is not installed"):
        simulate(cfg, out=lambda s: None)
    assert not (tmp_path / "sim").exists()


def test_tracking_off_does_nothing(tmp_path):
    t = tracking.Tracker(load_config({}).to_flat(), None)
    t.start(kind="simulation", rounds=[record(1)])
    t.log_round(record(1))
    t.finish(summary(1), status="finished")
    t.fail()
    tracking.log_report(load_config({}).to_flat(), tmp_path)
    assert tracking.log_baselines(load_config({}).to_flat(), tmp_path, [{"name": "x", "accuracy": 1.0}]) == []
    assert list(tmp_path.iterdir()) == []


def test_settings_are_checked():
    assert load_config({"fed.tracking": " MLflow , tensorboard"}).fed.tracking == " MLflow , tensorboard"
    assert tracking.parse(" MLflow , tensorboard") == ("mlflow", "tensorboard")
    with pytest.raises(ConfigError) as e:
        load_config({"fed.tracking": "mlflow,wandb", "fed.tracking-uri": "runs/mlruns"})
    assert "fed.tracking: expected empty (off) or a comma-separated list of mlflow, tensorboard" in str(e.value)
    assert "fed.tracking-uri: expected an MLflow tracking URI" in str(e.value)
    with pytest.raises(ConfigError, match="fed.tracking-uri is for MLflow"):
        load_config({"fed.tracking": "tensorboard", "fed.tracking-uri": "http://localhost:5000"})


def test_an_mlflow_store_that_does_not_open_fails_before_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FedtuneError, match="cannot open the MLflow tracking store"):
        tracking.Tracker({"fed.tracking": "mlflow", "fed.tracking-uri": f"sqlite:///{blocker}/sub/mlflow.db"},
                         tmp_path / "run")


@pytest.mark.slow
def test_a_tracked_simulation_logs_every_round_the_report_and_the_adapter(tmp_path):
    """A real simulation (3 nodes, 2 rounds, DP and secure aggregation) with fed.tracking=mlflow,tensorboard and the
    default store beside the run directory; every logged value read back and compared with rounds.jsonl."""
    from fedtune.simulations.run import simulate

    run_dir = tmp_path / "runs" / "tracked"
    cfg = load_config({"data.max-records": 240, "model.max-length": 16, "train.local-steps": 2, "train.batch-size": 8,
                       "sim.partitioner": "iid", "fed.num-nodes": 3, "fed.min-nodes": 3, "train.rounds": 2,
                       "fed.node-wait-timeout": 120, "fed.run-dir": str(run_dir),
                       "fed.tracking": "mlflow,tensorboard"})
    said: list[str] = []
    simulate(cfg, out=said.append)
    assert any(s.startswith("tracking: MLflow run") for s in said)

    rd = RunDir(run_dir)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # the default: beside the run directory
    client, run = mlflow_run(uri, run_dir)
    assert_logged_as_recorded(rd, client, run, tensorboard_scalars(rd.tensorboard_dir))
    assert len(rd.rounds()) == 2 and {k for k in run.data.metrics if k.startswith("epsilon/")} == {
        "epsilon/node-0", "epsilon/node-1", "epsilon/node-2"}
    assert run.data.params == {k: str(v) for k, v in rd.read_config().items()}
    assert run.info.status == "FINISHED" and run.data.tags["fedtune.kind"] == "simulation"
    final = rd.summary().final_test
    assert run.data.metrics["final/test/accuracy"] == final["accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "plots", "summary.json", "adapter"} <= artifacts
    adapter = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert adapter == {p.name for p in rd.final_adapter.iterdir()}
    # the artifacts live beside the store, not in the working directory
    assert (tmp_path / "runs" / "mlartifacts").is_dir()
