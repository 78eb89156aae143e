"""The dashboard's HTTP API over run directories: pages, live fragments, /metrics, and safety."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from fedtune.common.operations.rundir import RunSummary
from fedtune.server.dashboard import create_app
from helpers import make_run, round_line
from prometheus_client.parser import text_string_to_metric_families


def _client(tmp_path):
    make_run(tmp_path / "runs" / "run-a", finished=True)
    live = make_run(tmp_path / "runs" / "run-b", finished=False)
    return TestClient(create_app(tmp_path / "runs"), base_url="http://127.0.0.1"), live


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
    live.append_round(round_line(3, per_node={"a": {"status": "ok", "epsilon": 8.0, "max_epsilon": 8.0}}))
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
    live.append_round(round_line(3, per_node={"a": {"status": "ok", "epsilon": 1.0}, "b": {"status": "error"}},
                             failures=[{"node": "b", "status": "error", "reason": evil}]))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in live.path.rglob("*") if p.is_file()}
    for text in (client.get("/runs/run-b").text, json.dumps(client.get("/runs/run-b/fragment").json())):
        assert "<script>alert" not in text and "<img src=x" not in text and "&lt;script&gt;" in text
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in live.path.rglob("*") if p.is_file()}
    assert before == after  # the dashboard never writes


def test_a_token_guards_every_page_and_metrics(tmp_path):
    make_run(tmp_path / "runs" / "run-a", finished=True)
    token = "s3cret-token-0123456789"
    client = TestClient(create_app(tmp_path / "runs", token=token), base_url="https://127.0.0.1")
    for path in ("/", "/runs/run-a", "/metrics", "/api/runs"):
        r = client.get(path)
        assert r.status_code == 401 and "authentication required" in r.text and "run-a" not in r.text
        assert client.get(path, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    browser = TestClient(create_app(tmp_path / "runs", token=token), base_url="https://127.0.0.1")
    first = browser.get(f"/runs/run-a?token={token}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/runs/run-a"
    assert "httponly" in first.headers["set-cookie"].lower() and "secure" in first.headers["set-cookie"].lower()
    assert browser.get("/runs/run-a").status_code == 200  # the cookie now carries the token


def test_off_this_host_the_dashboard_needs_tls_and_a_token(tmp_path, capsys):
    import socket
    import ssl
    import subprocess
    import sys
    import time

    import httpx
    from fedtune.cli import main
    from fedtune.common.operations import keys as pki

    make_run(tmp_path / "runs" / "run-a", finished=True)
    runs = str(tmp_path / "runs")
    assert main(["dashboard", runs, "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to serve the dashboard on 0.0.0.0 without TLS and a token" in err and "fix:" in err
    pki.make_ca(tmp_path / "keys")
    pki.make_server_cert(tmp_path / "keys", hosts=["127.0.0.1"])
    cert, key = str(tmp_path / "keys" / "server.crt"), str(tmp_path / "keys" / "server.key")
    assert main(["dashboard", runs, "--host", "0.0.0.0", "--tls-cert", cert, "--tls-key", key]) == 1  # no token
    assert "without TLS and a token" in capsys.readouterr().err
    (tmp_path / "token").write_text("short")
    assert main(["dashboard", runs, "--host", "0.0.0.0", "--tls-cert", cert, "--tls-key", key,
                 "--token-file", str(tmp_path / "token")]) == 1
    assert "too short" in capsys.readouterr().err
    token = "0123456789abcdef0123456789abcdef"
    (tmp_path / "token").write_text(token + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "dashboard", runs, "--host", "0.0.0.0", "--port",
                               str(port), "--tls-cert", cert, "--tls-key", key, "--token-file",
                               str(tmp_path / "token")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "keys" / "ca.crt"))
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/", verify=ctx)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and server.poll() is None, server.stdout.read()
                time.sleep(0.3)
        assert r.status_code == 401
        ok = httpx.get(f"https://127.0.0.1:{port}/", verify=ctx, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and "run-a" in ok.text
        with pytest.raises(httpx.HTTPError):  # and no plain HTTP at all
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_run_page_shows_majority_baseline_warning_and_fairness_audit(tmp_path):
    from fedtune.common.training.fairness import audit
    from fedtune.common.training.imbalance import learned_nothing, majority_baseline

    # Prepare: a finished run whose model always answers 'ham' on a skewed, grouped test split
    gold = ["ham"] * 8 + ["spam"] * 2
    groups = ["<b>north</b>"] * 5 + ["south"] * 5
    baseline = majority_baseline(gold, ["ham", "spam"])
    test = {"accuracy": 0.8, "macro_f1": 0.444, "per_class": {"ham": {"predicted": 10}, "spam": {"predicted": 0}},
            "fairness": audit(np.array([0] * 8 + [1] * 2), np.zeros(10, dtype=int), groups, ["ham", "spam"])}
    warning = learned_nothing(test, baseline)
    assert warning
    rd = make_run(tmp_path / "runs" / "run-a", finished=True)
    from fedtune.common.training.fairness import node_cells, pool_cells

    nodes = pool_cells([node_cells(np.array([0, 1, 0]), np.array([0, 0, 0]), ["east", "<i>west</i>", "east"],
                                   ("east", "<i>west</i>"), 2)], ("east", "<i>west</i>"), ["ham", "spam"])
    rd.write_summary(RunSummary.from_json({"final": {"test": test}, "majority_baseline": baseline,
                                           "warnings": [warning], "federated_eval": {"accuracy": 0.67, "fairness": nodes}}))
    client = TestClient(create_app(tmp_path / "runs"), base_url="http://localhost:8050")
    # Execute
    page = client.get("/runs/run-a").text
    fragment = client.get("/runs/run-a/fragment").json()["quality-block"]
    # Assert: the warning, the baseline next to the model's figures, and each group's row (markup escaped)
    for html_ in (page, fragment):
        assert "WARNING:" in html_ and "collapsed onto one class" in html_
        assert "majority-class baseline accuracy 0.8000" in html_ and "always ham" in html_
        assert "<table id=fairness>" in html_ and "&lt;b&gt;north&lt;/b&gt;" in html_ and "<b>north</b>" not in html_
        assert "demographic-parity difference" in html_
        # the nodes' audit (pooled noised answers), in its own table, marked as estimates
        assert "<table id=fairness-nodes>" in html_ and "&lt;i&gt;west&lt;/i&gt;" in html_ and "estimates" in html_


def test_a_foreign_host_header_is_refused_dns_rebinding(tmp_path):
    """In its default mode (loopback, no token) the dashboard answered any Host: a page on attacker.example that
    rebinds its name to 127.0.0.1 could read every run's config and node names from the operator's browser."""
    make_run(tmp_path / "runs" / "run-a", finished=True)
    app = create_app(tmp_path / "runs")
    for base in ("http://attacker.example", "http://attacker.example:8050", "http://127.0.0.1.attacker.example"):
        r = TestClient(app, base_url=base).get("/")
        assert r.status_code == 400 and "run-a" not in r.text and "--allowed-host" in r.text
        assert TestClient(app, base_url=base).get("/metrics").status_code == 400
    for host in ("127.0.0.1:8050", "localhost", "[::1]:8050", "LOCALHOST:8050"):
        assert TestClient(app).get("/", headers={"host": host}).status_code == 200
    proxied = create_app(tmp_path / "runs", allowed_hosts=["fl-dash.example.org"])
    assert TestClient(proxied, base_url="https://fl-dash.example.org").get("/").status_code == 200
    assert TestClient(proxied, base_url="https://attacker.example").get("/").status_code == 400
