"""The privacy-utility curve (`fedtune demo/baselines --epsilons`): real runs at each epsilon, in the report and
the dashboard, each point's privacy as its own nodes' ledgers hold it."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from fedtune.cli import main
from fedtune.common.errors import FedtuneError
from fedtune.common.operations.curve import parse_epsilons
from fedtune.common.privacy.ledger import open_all
from fedtune.server.dashboard import create_app

FAST = ["train.rounds=1", "sim.baseline-epochs=0.5", "data.max-records=200", "lora.head-only=true"]


@pytest.mark.slow
def test_the_curve_runs_each_epsilon_and_is_drawn_in_the_report_and_dashboard(tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = runs / "job"
    assert main(["demo", "tiny", "--run-dir", str(run_dir), "--epsilons", "8,1", *FAST]) == 0
    curve = json.loads((run_dir / "curve.json").read_text())
    assert [p["epsilon"] for p in curve["points"]] == [1.0, 8.0]
    low, job = curve["points"]
    assert job["run_dir"] == str(run_dir)  # the job's own epsilon reuses the baselines just run
    for p in curve["points"]:
        for key in ("federated", "centralized", "local_only"):
            assert 0.0 <= p[key]["accuracy"] <= 1.0, (p["epsilon"], key, p[key])
        # what each point's nodes spent is within that point's target, as their own ledgers say
        assert 0 < p["federated"]["epsilon"] <= p["epsilon"] * (1 + 1e-6)
        assert 0 < p["centralized"]["epsilon"] <= p["epsilon"] * (1 + 1e-6)
    # epsilon 1 ran as its own job: its own run directory and simulated nodes, none of the job's ledgers touched
    ledgers = [lg for d in sorted((runs / "job-eps1" / "nodes").glob("node-*")) for lg in open_all(d)]
    assert ledgers and all(0 < lg.spent() <= 1 + 1e-6 for lg in ledgers)
    assert curve["nodp"]["accuracy"] is not None and curve["majority"]["accuracy"] is not None
    out = capsys.readouterr().out
    assert "| target epsilon | federated DP |" in out and "privacy-utility curve: epsilon 1 (1 of 2)" in out
    report = (run_dir / "report.md").read_text()
    assert "## Privacy-utility curve" in report and "![Privacy-utility](plots/privacy_utility.png)" in report
    assert (run_dir / "plots" / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the dashboard shows the same curve on the run's page; a run without one answers 404 for it
    client = TestClient(create_app(runs), base_url="http://127.0.0.1")
    assert "id=privacy-utility" in client.get("/runs/job").text
    svg = client.get("/runs/job/charts/privacy-utility.svg")
    assert svg.status_code == 200 and "<svg" in svg.text and "federated DP" in svg.text
    assert "id=privacy-utility" not in client.get("/runs/job-eps1").text
    assert client.get("/runs/job-eps1/charts/privacy-utility.svg").status_code == 404


@pytest.mark.parametrize("text", ["", "0,1", "1,x", "nan", "-2", "1e9", ",".join(str(i) for i in range(1, 14))])
def test_bad_epsilons_are_one_clear_error_before_anything_runs(text, tmp_path, capsys):
    with pytest.raises(FedtuneError, match="--epsilons"):
        parse_epsilons(text)
    run_dir = tmp_path / "run"
    assert main(["demo", "tiny", "--run-dir", str(run_dir), "--epsilons", text]) != 0
    err = capsys.readouterr().err
    assert "--epsilons" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_epsilons_are_sorted_and_deduplicated():
    assert parse_epsilons("8, 1,2,2 ,4") == [1.0, 2.0, 4.0, 8.0]


def test_a_damaged_curve_file_draws_what_it_can():
    """curve.json lives in a run directory a person may edit: bad points are left out, never a traceback."""
    from fedtune.common.operations.curve import draw, table

    curve = {"points": [{"epsilon": "eight", "federated": {"accuracy": 0.9}}, {"epsilon": -1.0}, "junk",
                        {"epsilon": 2.0, "federated": {"accuracy": 0.8}, "centralized": {"error": "not run"}}],
             "nodp": {"accuracy": 0.95}}
    rows = table(curve)
    assert [r for r in rows if r.startswith("| 2 |")] == ["| 2 | 0.8000 | not run | - | - |"]
    assert len(rows) == 2 + 1 + 1  # header, the one usable point, the no-DP level
    assert b"<svg" in draw(curve, fmt="svg")


def test_epsilons_on_a_job_without_dp_is_one_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["demo", "tiny", "--run-dir", str(run_dir), "--epsilons", "1,8", "privacy.enabled=false",
                 "sim.node-max-epsilon=inf"]) == 1
    err = capsys.readouterr().err
    assert "privacy.enabled=true" in err and "Traceback" not in err
    assert not run_dir.exists()
