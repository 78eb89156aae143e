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
    assert "fill amber" in page.text and "too many nodes dropped out" in page.text
    red = [row for row in page.text.split("<tr") if "fill red" in row]  # only c, whose ceiling refused work
    assert len(red) == 1 and "data-node='c'" in red[0]
    svg = client.get("/runs/run-b/charts/accuracy.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and b"<svg" in svg.content
    before = client.get("/runs/run-b/fragment").json()["rounds"].count("<tr")
    live.append_round(round_line(3, per_node={"a": {"status": "ok", "epsilon": 8.0, "max_epsilon": 8.0}}))
    after = client.get("/runs/run-b/fragment").json()
    assert after["rounds"].count("<tr") == before + 1
    at_ceiling = after["nodes"].split("data-node='a'")[1].split("</tr>")[0]  # spent up to its ceiling: not refused
    assert "fill amber" in at_ceiling and "fill red" not in at_ceiling


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


# -- issue 29: a dashboard an administrator can run a federation from -------------------------------------------
def _live_run(path, *, rounds_done: int = 2):
    """A running run whose server is in round ``rounds_done + 1``'s training, as its progress.json says."""
    import time

    from fedtune.common.operations.records import SECURE_TRAINING, RoundProgress

    rd = make_run(path, finished=False) if rounds_done else _bare_run(path)
    now = time.time()
    rd.write_progress(RoundProgress(round=rounds_done + 1, planned_rounds=3, phase=SECURE_TRAINING,
                                    secure_aggregation=True, nodes_connected=4, nodes_asked=3, round_started=now - 75,
                                    phase_started=now - 42, timeout=900.0, updated=now - 42,
                                    majority_baseline={"accuracy": 0.55, "macro_f1": 0.35, "label": "ham"}))
    return rd


def _bare_run(path, config=None):
    from fedtune.common.operations.rundir import RunDir

    rd = RunDir(path)
    rd.create(config=config or {"privacy.enabled": True, "fed.secure-aggregation": True}, planned_rounds=3,
              resume=False)
    return rd


def test_the_live_box_shows_where_a_running_server_is_and_goes_when_it_ends(tmp_path, capsys):
    """Round 1 used to show empty tables and blank axes for minutes: the server's progress.json now says where it is."""
    import re

    from fedtune.cli import main

    rd = _live_run(tmp_path / "runs" / "run-b")
    client = TestClient(create_app(tmp_path / "runs"), base_url="http://127.0.0.1")
    page, live = client.get("/runs/run-b").text, client.get("/runs/run-b/fragment").json()["live"]
    for html_ in (page, live):
        assert "Round 3 of 3: training and secure aggregation" in html_
        assert "connected <b>4</b>" in html_ and "asked <b>3</b>" in html_ and "replied <b>&ndash;</b>" in html_
        assert re.search(r"training and secure aggregation for 4[23] s of the 900 s round timeout", html_)
        assert re.search(r"round started 7[56] s ago", html_) and "2 of 3 rounds finished" in html_
    assert main(["status", str(rd.path)]) == 0
    assert "now: round 3 of 3, training and secure aggregation for 4" in capsys.readouterr().out
    # the run ends: no live box (the JS swaps in the empty one), whatever progress.json still says
    rd.append_round(round_line(3, per_node={"a": {"status": "ok", "epsilon": 8.0, "max_epsilon": 8.0}}))
    rd.set_status("finished")
    assert client.get("/runs/run-b/fragment").json()["live"] == "<div id=live></div>"
    assert "Round 3 of 3" not in client.get("/runs/run-b").text


def test_before_the_first_round_the_page_says_so_instead_of_blank_tables_and_axes(tmp_path):
    from fedtune.common.operations.records import RoundProgress

    rd = _live_run(tmp_path / "runs" / "new", rounds_done=0)
    client = TestClient(create_app(tmp_path / "runs"), base_url="http://127.0.0.1")
    page = client.get("/runs/new").text
    assert "Round 1 of 3" in page and "no round finished yet: round 1 is under way" in page
    assert "no node has replied yet" in page
    assert "<!-- no round finished yet -->" in client.get("/runs/new/charts/accuracy.svg").text
    rd.write_progress(RoundProgress(round=0, phase="preparing", phase_started=0.0))
    assert "Preparing the run" in client.get("/runs/new/fragment").json()["live"]


def test_the_runs_index_is_newest_first_with_final_accuracy_max_epsilon_and_status_colour(tmp_path):
    old = make_run(tmp_path / "runs" / "zz-old", finished=True)
    old.set_status("finished", started=1_000_000.0)
    live = _live_run(tmp_path / "runs" / "aa-live")
    live.set_status("running", started=3_000_000.0)
    stopped = make_run(tmp_path / "runs" / "mm-stopped", finished=True)
    stopped.set_status("stopped", started=2_000_000.0)
    stopped.write_summary(RunSummary.from_json({"final": {"test": {"accuracy": 0.9321}}}))
    page = TestClient(create_app(tmp_path / "runs"), base_url="http://127.0.0.1").get("/").text
    order = [page.index(f"data-run='{n}'") for n in ("aa-live", "mm-stopped", "zz-old")]
    assert order == sorted(order)  # by start time, newest first (not by name)
    assert "<th>final accuracy</th><th>max epsilon</th>" in page
    row = lambda n: page[page.index(f"data-run='{n}'"):].split("</tr>")[0]  # noqa: E731
    assert "s-running" in row("aa-live") and "round 3: training and secure aggregation" in row("aa-live")
    assert "s-finished" in row("zz-old") and "<td>0.8000</td><td>8.000</td>" in row("zz-old")  # last round's
    assert "s-stopped" in row("mm-stopped") and "<td>0.9321</td>" in row("mm-stopped")  # the summary's final


def test_budget_colour_spending_the_plan_is_not_red_a_refusal_is(tmp_path):
    """Red meant 'at the ceiling': a job planned to spend its target up to a node's ceiling showed red for doing
    exactly what it was asked. Red now means the ceiling refused work."""
    from fedtune.common.operations.monitoring import budget_state

    assert budget_state(8.0, 8.0, planned=8.0) == "amber"  # spent its plan, which was the whole ceiling
    assert budget_state(4.0, 10.0, planned=4.0) == "ok"  # spent its plan, 40% of the ceiling
    assert budget_state(4.0000001, 10.0, planned=4.0) == "ok"  # the accountant's rounding
    assert budget_state(6.0, 10.0, planned=4.0) == "amber"  # above the plan: earlier jobs on the source
    assert budget_state(None, 8.0, refused=True) == budget_state(3.0, 8.0, planned=8.0, refused=True) == "red"
    assert budget_state(None, 8.0) == "unknown"

    rd = _bare_run(tmp_path / "runs" / "run", {"privacy.enabled": True, "privacy.target-epsilon": 4.0})
    ok = lambda eps, cap: {"status": "ok", "epsilon": eps, "max_epsilon": cap, "delta": 1e-5}  # noqa: E731
    rd.append_round(round_line(1, per_node={"at-plan": ok(4.0, 10.0), "tight": ok(4.0, 4.0), "earlier": ok(6.0, 10.0),
                                            "refused": {"status": "refused"}},
                               failures=[{"node": "refused", "status": "refused", "reason": "privacy budget exceeded"}]))
    rd.set_status("finished")
    page = TestClient(create_app(tmp_path / "runs"), base_url="http://127.0.0.1").get("/runs/run").text
    row = lambda n: page[page.index(f"data-node='{n}'"):].split("</tr>")[0]  # noqa: E731
    assert "fill ok" in row("at-plan") and "40% of ceiling" in row("at-plan") and "100% of plan" in row("at-plan")
    assert "<td>4.00</td><td>10.00</td>" in row("at-plan") and "class=plan" in row("at-plan")  # planned, its tick
    assert "fill amber" in row("tight") and "fill red" not in row("tight")
    assert "fill amber" in row("earlier") and "above this job&#x27;s plan" in row("earlier")
    assert "fill red" in row("refused") and "refused by its ceiling (round 1)" in row("refused")


def test_round_ticks_are_whole_numbers_and_the_charts_draw_baseline_and_ceiling(tmp_path):
    import re

    make_run(tmp_path / "runs" / "run-a", finished=True)
    rd = _live_run(tmp_path / "runs" / "run-b")  # its progress.json knows the majority baseline already
    client = TestClient(create_app(tmp_path / "runs"), base_url="http://127.0.0.1")
    for run in ("run-a", "run-b"):
        for kind in ("accuracy", "loss", "epsilon"):
            svg = client.get(f"/runs/{run}/charts/{kind}.svg").text
            ticks = re.findall(r'<g id="xtick_\d+">.*?<!-- (.*?) -->', svg, re.S)
            assert ticks and all(t.isdigit() for t in ticks), (kind, ticks)
    assert "majority-class accuracy" in client.get("/runs/run-b/charts/accuracy.svg").text
    assert "node ceiling" in client.get("/runs/run-a/charts/epsilon.svg").text
    assert rd.progress().majority_baseline["label"] == "ham"


def test_configuration_is_collapsed_and_delta_shows_as_used(tmp_path):
    make_run(tmp_path / "runs" / "run-a", finished=True)
    rd = _bare_run(tmp_path / "runs" / "run-c", {"privacy.enabled": True, "privacy.delta": 1e-5,
                                                 "fed.round-timeout": 900.0})
    rd.append_round(round_line(1, per_node={"a": {"status": "ok", "epsilon": 1.0, "max_epsilon": 8.0,
                                                  "delta": 2.5e-6}}))
    client = TestClient(create_app(tmp_path / "runs"), base_url="http://127.0.0.1")
    page = client.get("/runs/run-a").text
    assert "delta 1e-5)" in page and "0.0000" not in page.split("id=head>")[1].split("</p>")[0]
    assert "<details id=config><summary>Configuration (2 settings)</summary>" in page  # no 'open': collapsed
    assert page.index("<details id=config>") < page.index("<h2>Rounds</h2>")  # under the summary
    page = client.get("/runs/run-c").text
    assert "delta 2.5e-6)" in page and "<td class='l v'>1e-5</td>" in page and "<td class='l v'>900</td>" in page


def test_metrics_export_accuracy_macro_f1_and_loss_per_round(tmp_path):
    from fedtune.common.operations.rundir import RoundRecord

    client, live = _client(tmp_path)
    live.append_round(RoundRecord(round=3, server_eval={"test": {"accuracy": 0.875, "macro_f1": 0.8125, "loss": 0.25},
                                                       "val": {"loss": 0.375}}))
    _live_run(tmp_path / "runs" / "run-c")
    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    val = lambda name, **lab: next(s.value for s in fams[name].samples  # noqa: E731
                                   if all(s.labels.get(k) == v for k, v in lab.items()))
    assert val("fedtune_round_test_accuracy", run="run-a", round="1") == 0.6
    assert val("fedtune_round_test_accuracy", run="run-a", round="3") == 0.8
    assert val("fedtune_round_test_loss", run="run-a", round="2") == 1.0
    assert val("fedtune_round_test_macro_f1", run="run-b", round="3") == 0.8125
    assert val("fedtune_round_val_loss", run="run-b", round="3") == 0.375
    assert val("fedtune_round_in_progress", run="run-c") == 3 and val("fedtune_nodes_connected", run="run-c") == 4
    assert "run-a" not in {s.labels["run"] for s in fams["fedtune_round_in_progress"].samples}  # finished


def test_a_progress_write_that_fails_never_fails_the_round(tmp_path, caplog):
    from types import SimpleNamespace

    from fedtune.common.operations.rundir import RunDir
    from fedtune.common.training.config import load_config
    from fedtune.server.federation import Federation

    (tmp_path / "not-a-dir").write_text("a file where the run directory should be")
    fed = Federation(load_config({}), RunDir(tmp_path / "not-a-dir"), SimpleNamespace(secure=False, name="fedavg"))
    fed._progress(round=1, phase="waiting for nodes", round_started=1.0, timeout=60.0)  # no exception
    assert "progress.json not written" in caplog.text
    ok = Federation(load_config({}), RunDir(tmp_path / "run"), SimpleNamespace(secure=True, name="secure"))
    ok._progress(round=2, phase="waiting for nodes", round_started=1.0, timeout=60.0)
    ok._progress(nodes_connected=3)
    ok._progress(phase="training and secure aggregation", nodes_asked=3, timeout=900.0)
    p = RunDir(tmp_path / "run").progress()
    assert (p.round, p.phase, p.nodes_connected, p.nodes_asked, p.nodes_replied, p.timeout, p.round_started) == (
        2, "training and secure aggregation", 3, 3, None, 900.0, 1.0)
    assert p.secure_aggregation and p.phase_started >= p.round_started
    ok._progress(round=3, phase="waiting for nodes")  # a new round carries nothing over
    assert RunDir(tmp_path / "run").progress().nodes_asked is None
