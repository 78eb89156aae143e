"""A real deployment on 127.0.0.1, started with `fedtune superlink` and `fedtune node`: a TLS SuperLink whose
Control API is on loopback only behind the Fleet gateway, organizations' SuperNodes as separate processes
with their own data, ledgers, identity keys and approved peers, DP + secure aggregation, via `flwr run`. Attacked
the way a second party and a wrong app bundle would attack it; and the SuperLink killed mid-run."""

from __future__ import annotations

import json
import ssl
import time

import httpx
import psutil
import pytest
from fedtune.common.privacy.ledger import open_all
from fedtune.simulations.deployment import LocalFederation
from helpers import EASY_LABELS, write_easy_csv

JOB = {"fed.min-nodes": 3, "fed.node-wait-timeout": 180.0, "data.labels": ",".join(EASY_LABELS),
       "data.max-records": 0, "model.max-length": 16, "train.batch-size": 8, "train.local-steps": 2,
       "train.threads": 1, "sim.baseline-epochs": 1.0}

EVIL_PYPROJECT = """[project]
name = "{name}"
version = "{version}"
dependencies = []

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "{pkg}.server:app"
clientapp = "{pkg}.{client}:app"

[tool.flwr.app.config]
out = ""
"""
EVIL_CLIENT = '''from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def steal(msg, context):  # read the organization's records and send them to the server
    data = Path(str(context.node_config["data-path"])).read_text()
    Path(str(context.node_config["state-dir"]), "PWNED").write_text(data)
    return Message(RecordDict({"loot": ConfigRecord({"data": data[:2000]})}), reply_to=msg)
'''
EVIL_SERVER = '''import json, time
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    nodes, deadline = [], time.time() + 120
    while time.time() < deadline and len(nodes) < 3:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    msgs = [Message(RecordDict({"x": ConfigRecord({"a": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = grid.send_and_receive(msgs, timeout=120)
    out = [{"node": str(r.metadata.src_node_id), "error": r.error.reason if r.has_error() else None,
            "loot": None if r.has_error() else dict(r.content["loot"])} for r in replies]
    with open(str(context.run_config["out"]), "w") as f:
        json.dump(out, f)
'''


def _bundle(tmp_path, *, name, publisher, version, pkg, client="client"):
    """An app bundle whose ClientApp steals; ``pkg`` may be dotted (``fedtune.client`` for an impostor)."""
    d = tmp_path / f"app-{name}-{pkg}"
    where = d.joinpath(*pkg.split("."))
    where.mkdir(parents=True)
    (d / "pyproject.toml").write_text(EVIL_PYPROJECT.format(name=name, publisher=publisher, version=version, pkg=pkg,
                                                            client=client))
    for part in range(1, len(pkg.split(".")) + 1):
        d.joinpath(*pkg.split(".")[:part], "__init__.py").write_text("")
    (where / f"{client}.py").write_text(EVIL_CLIENT)
    (where / "server.py").write_text(EVIL_SERVER)
    return d


def _start(fed, tmp_path, orgs, *, max_epsilon=8, bad=()):
    """Keys, the operator's SuperLink and registrations, and each organization's node (with the peers it approved)."""
    fed.make_keys(orgs + ["org-unregistered"])
    fed.start_superlink()
    for o in orgs:
        fed.register(o)
    data = {}
    for i, o in enumerate(orgs):
        data[o] = write_easy_csv(tmp_path / f"{o}.csv", n=60, seed=i)
        # each organization's own list of the peers it accepts (the others' keys), never the operator's
        fed.start_supernode(o, {"name": o, "data-path": str(data[o]), "state-dir": str(tmp_path / "state" / o),
                                "max-epsilon": max_epsilon, "approved-peers": str(fed.approve(o, orgs)),
                                "secagg-min-organizations": 3})
    return data


def _wait_online(fed, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = fed.flwr("supernode", "ls", "local-tls", "--format", "json")
        try:
            online = sum(x.get("status") == "online" for x in json.loads(r.stdout).get("nodes", []))
        except ValueError:  # the SuperLink is (re)starting
            online = 0
        if r.returncode == 0 and online >= n:
            return
        time.sleep(2)
    raise TimeoutError(f"fewer than {n} SuperNodes online after {timeout}s")


@pytest.mark.slow
def test_only_the_operator_controls_and_only_the_installed_app_runs(tmp_path):
    from fedtune.common.training.assets import default_model_dir
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    fed = LocalFederation(tmp_path / "fed")
    orgs = ["org-0", "org-1", "org-2", "org-3", "org-bad"]
    try:
        # Prepare
        data = _start(fed, tmp_path, orgs)
        intruder = fed.start_supernode("org-unregistered", {"name": "intruder", "max-epsilon": 8,
                                                            "data-path": str(data["org-0"]),
                                                            "state-dir": str(tmp_path / "state" / "x")})
        _wait_online(fed, 5)
        # -- a second party that reaches the SuperLink's address, with only the public CA certificate --------
        ctx = ssl.create_default_context(cafile=str(fed.keys / "ca.crt"))
        for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/control/register-node",
                     "/v1/runtime/acquire-task", "/v1/fleet/../control/list-runs"):
            r = httpx.post(f"https://127.0.0.1:{fed.port}{path}", verify=ctx, content=b"\x00")
            assert r.status_code == 403 and "only the Fleet API" in r.text, (path, r.status_code, r.text)
        listed = fed.flwr("ls", "outside")
        assert listed.returncode != 0 and "only the Fleet API" in listed.stdout + listed.stderr
        reg = fed.flwr("supernode", "register", str(fed.keys / "nodes" / "org-unregistered.pub"), "outside")
        assert reg.returncode != 0 and "only the Fleet API" in reg.stdout + reg.stderr
        evil = _bundle(tmp_path, name="evil", publisher="intruder", version="1.0.0", pkg="evil_app")
        started = fed.flwr("run", str(evil), "outside", "--run-config", 'out="/tmp/x"')
        assert started.returncode != 0 and "only the Fleet API" in started.stdout + started.stderr
        # the SuperLink itself listens on loopback only; the gateway is the one public door
        link = [p for p in psutil.process_iter(["cmdline"]) if "flower-superlink" in " ".join(p.info["cmdline"] or [])
                and str(fed.base) in " ".join(p.info["cmdline"] or [])]
        listening = {c.laddr for p in link for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        intruder.wait(timeout=120)  # an unregistered node still cannot join
        assert intruder.returncode != 0
        # -- a run of another app bundle, started with the operator's credentials: every node refuses ------
        impostor = _bundle(tmp_path, name="fedtune", publisher="fedtune", version="0.1.0", pkg="fedtune.client",
                           client="app")
        for app in (evil, impostor):
            out = tmp_path / f"{app.name}.json"
            r = fed.flwr("run", str(app), "local-tls", "--run-config", f'out="{out}"', "--format", "json")
            assert r.returncode == 0, r.stdout + r.stderr
            deadline = time.monotonic() + 240
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(2)
            replies = json.loads(out.read_text())
            assert len(replies) == 5 and all(x["error"] and x["loot"] is None for x in replies), replies
            if app is evil:  # a foreign app: refused before any of its code runs
                assert all("refused the run's app bundle" in x["error"] for x in replies)
            else:  # an impostor claiming to be fedtune: its code never runs, the installed fedtune app answers
                assert all("No query function registered" in x["error"] for x in replies)
        assert not list((tmp_path / "state").rglob("PWNED"))
        assert "refused the run's app bundle" in fed.log("org-1")  # the organization sees it in its log
        # -- the approved app still runs: DP and secure aggregation through the gateway ------------------------
        data["org-bad"].unlink()  # this organization's data goes missing while its node runs
        held_out = write_easy_csv(tmp_path / "server-held-out.csv", n=80, seed=99)
        run_dir = tmp_path / "run"
        killed = []

        def kill_org3_after_round_1() -> None:  # org-3 crashes while the run goes on
            if not killed and (run_dir / "rounds.jsonl").exists():
                fed.kill("org-3")
                killed.append(time.monotonic())

        info = fed.run({**JOB, "fed.run-dir": str(run_dir), "fed.num-nodes": 5, "train.rounds": 3,
                        "fed.round-timeout": 60.0, "fed.fraction-evaluate": 0.0, "data.path": str(held_out)},
                       timeout=900, while_waiting=kill_org3_after_round_1)
        assert info["status"] == "finished:completed", info
        rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2, 3] and killed
        assert all(r["status"] == "ok" and r["aggregation"] == "secagg+" for r in rounds), [r["reason"] for r in rounds]
        # round 1: the node whose data went missing fails (recorded), the other four are aggregated
        assert rounds[0]["nodes_asked"] == 5 and rounds[0]["nodes_replied"] == 4
        assert [(f["node"], f["status"]) for f in rounds[0]["failures"]] == [("org-bad", "error")]
        assert "does not exist" in rounds[0]["failures"][0]["reason"]
        assert "org-bad" in rounds[1]["nodes_benched"]

        def named(rnd: dict) -> set[str]:  # per-node figures are keyed by node id; names are only displayed
            return {rnd["per_node"][k]["name"] for k in rnd["epsilon_per_node"]}

        assert {"org-0", "org-1", "org-2"} <= named(rounds[1]) and "org-3" not in named(rounds[1])
        assert named(rounds[2]) == {"org-0", "org-1", "org-2"}
        assert all(k.isdigit() for r in rounds for k in r["per_node"])
        summary = json.loads((run_dir / "summary.json").read_text())
        by_name = {p["name"]: p for p in summary["privacy"]["nodes"].values()}
        assert summary["status"] == "finished" and summary["privacy"]["secure_aggregation"]
        for o in ("org-0", "org-1", "org-2"):  # each organization's ledger, on its own disk
            (ledger,) = open_all(tmp_path / "state" / o)
            assert [e.round for e in ledger.counted if e.job == "run"] == [1, 2, 3]
            assert 0 < ledger.spent() <= 8 and ledger.spent() == pytest.approx(by_name[o]["epsilon"])
        assert "approved-peers=" not in fed.log("org-0")  # peers' keys were checked against its own approved list
        base = AutoModelForSequenceClassification.from_pretrained(str(default_model_dir()), num_labels=2)
        PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())
    ours = [q for q in psutil.process_iter(["cmdline"]) if str(fed.base) in " ".join(q.info["cmdline"] or [])]
    assert not ours, "processes left behind"


@pytest.mark.slow
def test_a_superlink_restart_mid_run_resumes_without_spending_twice(tmp_path):
    fed = LocalFederation(tmp_path / "fed")
    orgs = ["org-0", "org-1", "org-2"]
    try:
        _start(fed, tmp_path, orgs, max_epsilon=20)
        _wait_online(fed, 3)
        run_dir = tmp_path / "run"
        job = {**JOB, "fed.run-dir": str(run_dir), "fed.num-nodes": 3, "train.rounds": 3, "fed.round-timeout": 120.0,
               "data.path": str(write_easy_csv(tmp_path / "held-out.csv", n=80, seed=99))}
        crashed = []

        def crash_after_round_1() -> None:  # the SuperLink host loses power: SuperLink and ServerApp die
            if not crashed and (run_dir / "rounds.jsonl").exists():
                fed.kill("superlink")
                crashed.append(time.monotonic())
                raise TimeoutError("crashed")

        with pytest.raises(TimeoutError, match="crashed"):
            fed.run(job, timeout=600, while_waiting=crash_after_round_1)
        assert len((run_dir / "rounds.jsonl").read_text().splitlines()) == 1
        # Execute: the operator restarts the SuperLink (same database) and resumes the run from its directory
        fed.start_superlink()
        _wait_online(fed, 3, timeout=300)
        info = fed.run({**job, "fed.resume": True}, timeout=900)
        # Assert
        assert info["status"] == "finished:completed", info
        rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [(r["round"], r["status"]) for r in rounds] == [(1, "ok"), (2, "ok"), (3, "ok")], rounds[-1]["reason"]
        summary = json.loads((run_dir / "summary.json").read_text())
        for o in orgs:
            (ledger,) = open_all(tmp_path / "state" / o)
            train = [e.round for e in ledger.counted if e.kind == "train"]
            assert train.count(1) == 1 and train.count(3) == 1  # a completed round is never trained (spent) twice
            assert set(train) == {1, 2, 3}  # round 2 may have started before the crash: then both count
            by_name = {p["name"]: p for p in summary["privacy"]["nodes"].values()}
            assert ledger.spent() == pytest.approx(by_name[o]["epsilon"]) and ledger.spent() <= 20
    finally:
        fed.stop()
