"""A real deployment on 127.0.0.1: TLS SuperLink with node authentication, organizations' SuperNodes as
separate processes with their own data and ledgers, DP + secure aggregation, via `flwr run`."""

from __future__ import annotations

import json
import time

import pytest
from conftest import EASY_LABELS, write_easy_csv

from common.ledger import open_all
from simulations.deployment import LocalFederation


@pytest.mark.slow
def test_tls_authenticated_federation_with_dp_and_secure_aggregation(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.assets import default_model_dir

    fed = LocalFederation(tmp_path / "fed")
    orgs = ["org-0", "org-1", "org-2", "org-3", "org-bad"]
    t0 = time.monotonic()
    timings = {}
    try:
        # Prepare: keys, each organization's own data and state directory
        fed.make_keys(orgs + ["org-unregistered"])
        fed.start_superlink()
        timings["superlink"] = time.monotonic() - t0
        for o in orgs:
            fed.register(o)
        # the roster the operator distributes: the public keys of the registered nodes, by name
        roster = tmp_path / "roster"
        roster.mkdir()
        for o in orgs:
            (roster / f"{o}.pub").write_bytes((fed.keys / "nodes" / f"{o}.pub").read_bytes())
        for i, o in enumerate(orgs):
            data = write_easy_csv(tmp_path / f"{o}.csv", n=60, seed=i)
            fed.start_supernode(o, {"name": o, "data-path": str(data) if o != "org-bad" else "/nonexistent/notes.csv",
                                    "state-dir": str(tmp_path / "state" / o), "max-epsilon": 8,
                                    "identity-key": str(fed.keys / "nodes" / f"{o}.key"), "roster": str(roster)})
        intruder = fed.start_supernode("org-unregistered", {"name": "intruder", "max-epsilon": 8,
                                                            "state-dir": str(tmp_path / "state" / "x")})
        held_out = write_easy_csv(tmp_path / "server-held-out.csv", n=80, seed=99)
        run_dir = tmp_path / "run"
        # Execute: a 2-round job with DP and secure aggregation through `flwr run`
        t1 = time.monotonic()
        killed = []

        def kill_org3_after_round_1() -> None:  # org-3 crashes while the run goes on
            if not killed and (run_dir / "rounds.jsonl").exists():
                fed.kill("org-3")
                killed.append(time.monotonic())

        info = fed.run({"fed.run-dir": str(run_dir), "fed.num-nodes": 5, "fed.min-nodes": 3, "train.rounds": 3,
                        "fed.node-wait-timeout": 120.0, "fed.round-timeout": 60.0, "fed.fraction-evaluate": 0.0,
                        "data.path": str(held_out), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                        "model.max-length": 16, "train.batch-size": 8, "train.local-steps": 2,
                        "train.threads": 1, "sim.baseline-epochs": 1.0}, timeout=900,
                       while_waiting=kill_org3_after_round_1)
        timings["run"] = time.monotonic() - t1
        # Assert: the unregistered node was refused and never took part
        intruder.wait(timeout=60)
        assert intruder.returncode != 0
        assert info["status"] == "finished:completed", info
        rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2, 3] and killed
        assert all(r["status"] == "ok" and r["aggregation"] == "secagg+" for r in rounds), [r["reason"] for r in rounds]
        # round 1: the node with a wrong data path fails (recorded), the other four are aggregated
        assert rounds[0]["nodes_asked"] == 5 and rounds[0]["nodes_replied"] == 4
        assert [(f["node"], f["status"]) for f in rounds[0]["failures"]] == [("org-bad", "error")]
        assert "does not exist" in rounds[0]["failures"][0]["reason"]
        # round 2: org-bad sits out one round; org-3 was killed: the round completes from the survivors
        assert "org-bad" in rounds[1]["nodes_benched"]

        def named(rnd: dict) -> set[str]:  # per-node figures are keyed by node id; names are only displayed
            return {rnd["per_node"][k]["name"] for k in rnd["epsilon_per_node"]}

        assert {"org-0", "org-1", "org-2"} <= named(rounds[1]) and "org-3" not in named(rounds[1])
        # round 3 goes on without org-3 (and with org-bad failing again)
        assert named(rounds[2]) == {"org-0", "org-1", "org-2"}
        assert all(k.isdigit() for r in rounds for k in r["per_node"])
        summary = json.loads((run_dir / "summary.json").read_text())
        by_name = {p["name"]: p for p in summary["privacy"]["nodes"].values()}
        assert summary["status"] == "finished" and summary["privacy"]["secure_aggregation"]
        # each organization's ledger, on its own disk, holds exactly its two releases within its ceiling
        for o in ("org-0", "org-1", "org-2"):
            (ledger,) = open_all(tmp_path / "state" / o)
            assert [e.round for e in ledger.entries] == [1, 2, 3]
            assert 0 < ledger.spent() <= 8
            assert ledger.spent() == pytest.approx(by_name[o]["epsilon"])
        assert not open_all(tmp_path / "state" / "org-bad")
        base = AutoModelForSequenceClassification.from_pretrained(str(default_model_dir()), num_labels=2)
        PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    finally:
        fed.stop()
        print(f"deployment timings (s): {timings}")
    assert all(p.poll() is not None for p in fed.procs.values())
    import psutil

    ours = [q for q in psutil.process_iter(["cmdline"]) if str(fed.base) in " ".join(q.info["cmdline"] or [])]
    assert not ours, "processes left behind"
