"""The dashboard's HTTP API over run directories: pages, live fragments, /metrics, and safety."""

from __future__ import annotations

import hashlib
import json

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_monitoring import _make_run, _round

from server.dashboard import create_app


def _client(tmp_path):
    _make_run(tmp_path / "runs" / "run-a", finished=True)
    live = _make_run(tmp_path / "runs" / "run-b", finished=False)
    return TestClient(create_app(tmp_path / "runs")), live


def test_pages_and_live_fragment(tmp_path):
    client, live = _client(tmp_path)
    index = client.get("/").text
    assert "run-a" in index and "run-b" in index and "running" in index
    page = client.get("/runs/run-b")
    assert page.status_code == 200 and "<table id=rounds>" in page.text and "setInterval(refresh" in page.text
    assert "fill red" not in page.text and "fill amber" in page.text and "too many nodes dropped out" in page.text
    svg = client.get("/runs/run-b/charts/accuracy.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and b"<svg" in svg.content
    before = client.get("/runs/run-b/fragment").json()["rounds"].count("<tr")
    live.append_round(_round(3, per_node={"a": {"status": "ok", "epsilon": 8.0, "max-epsilon": 8.0}}))
    after = client.get("/runs/run-b/fragment").json()
    assert after["rounds"].count("<tr") == before + 1 and "fill red" in after["nodes"]


def test_metrics_parse_and_match_the_run_directory(tmp_path):
    client, _ = _client(tmp_path)
    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    val = lambda name, **lab: next(s.value for s in fams[name].samples  # noqa: E731
                                   if all(s.labels.get(k) == v for k, v in lab.items()))
    assert val("fedtune_rounds_completed", run="run-a") == 3 and val("fedtune_rounds_planned", run="run-a") == 3
    assert val("fedtune_rounds_failed", run="run-a") == 1 and val("fedtune_run_running", run="run-b") == 1
    assert val("fedtune_node_epsilon", run="run-a", node="a") == 8.0
    assert val("fedtune_node_epsilon_ceiling", run="run-a", node="b") == 8.0
    rounds = [json.loads(x) for x in (tmp_path / "runs" / "run-a" / "rounds.jsonl").read_text().splitlines()]
    assert val("fedtune_bytes_received", run="run-a") == sum(r["bytes_received"] for r in rounds)


def test_path_traversal_and_markup_are_harmless(tmp_path):
    client, live = _client(tmp_path)
    (tmp_path / "secret.txt").write_text("top secret")
    for url in ("/runs/..%2Fsecret.txt", "/runs/../secret.txt", "/runs/%2e%2e/charts/accuracy.svg",
                "/runs/run-a/charts/..%2F..%2Fsecret.txt", "/api/runs/..%2F..%2Fetc%2Fpasswd"):
        r = client.get(url)
        assert r.status_code in (404, 422) and "top secret" not in r.text, url
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    live.append_round(_round(3, per_node={"a": {"status": "ok", "epsilon": 1.0}, "b": {"status": "error"}},
                             failures=[{"node": "b", "status": "error", "reason": evil}]))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in live.path.rglob("*") if p.is_file()}
    for text in (client.get("/runs/run-b").text, json.dumps(client.get("/runs/run-b/fragment").json())):
        assert "<script>alert" not in text and "<img src=x" not in text and "&lt;script&gt;" in text
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in live.path.rglob("*") if p.is_file()}
    assert before == after  # the dashboard never writes
