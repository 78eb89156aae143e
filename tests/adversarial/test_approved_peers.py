"""Attack: the roster of peers came from the operator it protects against.

docs/deployment.md had the operator build and hand out the roster of peers' signing keys. An operator who adds
two identities of its own passed every node check (cohort 3, strict-majority threshold 2, valid signatures) and
read the victim's update from the "secure" sum. Now each organization lists the peers it accepts in its own node
config (public keys exchanged and checked out of band), refuses a cohort with anyone else in it, and needs
secagg-min-organizations distinct organizations in a cohort.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fedtune.client.app import make_client_app
from fedtune.client.node_config import node_settings
from fedtune.common.errors import ConfigError
from fedtune.common.operations import keys as pki
from fedtune.common.privacy.ledger import PrivacyLedger
from fedtune.common.training import adapter
from fedtune.server.secure import SecureFedAvg
from helpers import EASY_LABELS, small_settings, write_easy_csv
from scripted_server import InProcessGrid, ScriptedServer, task_identity


def _keys(tmp_path, *names):
    for n in names:
        pki.make_node_keys(tmp_path / "keys", n.replace("/", "--"))
    return tmp_path / "keys"


def _approved(tmp_path, owner: str, names) -> str:
    """The directory of public keys `owner`'s organization approved (copied from what peers sent out of band)."""
    d = tmp_path / "approved" / owner.replace("/", "--")
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        f = n.replace("/", "--") + ".pub"
        shutil.copy(tmp_path / "keys" / f, d / f)
    return str(d)


def _node(tmp_path, nid: int, name: str, run: dict, **conf) -> ScriptedServer:
    csv = write_easy_csv(tmp_path / f"data-{nid}.csv", n=40, seed=nid)
    base = {"name": name, "data-path": str(csv), "state-dir": str(tmp_path / "state" / str(nid)), "max-epsilon": float("inf"),
            "identity-key": str(tmp_path / "keys" / (name.replace("/", "--") + ".key"))}
    return ScriptedServer(make_client_app(), node_config={**base, **conf}, run_config=run, node_id=nid)


RUN = small_settings(**{"data.labels": ",".join(EASY_LABELS), "data.max-records": 0, "train.local-steps": 1,
                        "privacy.enabled": False, "train.optimizer": "sgd", "train.lr": 0.5, "fed.min-nodes": 3})


def _secure() -> SecureFedAvg:
    return SecureFedAvg(weighting="weighted", min_nodes=3, timeout=60, clip=1.0, max_weight=1000, threshold=0.5,
                        degree=0)


def _round(grid, ids, start, rnd=1, job="j"):
    return _secure().run_round(grid, server_round=rnd, node_ids=list(ids), global_arrays=start,
                               config={"job": job, "server-round": rnd}, names={})


@pytest.fixture
def start(minilm_easy, monkeypatch):
    task_identity(monkeypatch)
    return adapter.pack(minilm_easy.model, ffa=False)


def test_two_sybils_of_the_operator_are_refused_by_the_victims_own_list(tmp_path, start):
    _keys(tmp_path, "hospital-a", "clinic-b", "lab-c", "sybil-1", "sybil-2")
    sybils = {nid: _node(tmp_path, nid, name, RUN, **{"approved-peers": "*"})  # the operator's own nodes
              for nid, name in ((301, "sybil-1"), (302, "sybil-2"))}
    # before: the victim trusted the roster the operator handed out, which lists the operator's identities
    operators_roster = _approved(tmp_path, "operator", ["hospital-a", "clinic-b", "lab-c", "sybil-1", "sybil-2"])
    trusting = _node(tmp_path, 201, "hospital-a", RUN, **{"approved-peers": operators_roster,
                                                          "secagg-min-organizations": 1})
    out = _round(InProcessGrid({201: trusting, **sybils}), [201, 301, 302], start)
    assert out.new_arrays is not None  # the 'secure' sum of one victim and two sybils: its update, exactly
    # now: the organization approved the peers it checked out of band; the operator's identities are not among them
    victim = _node(tmp_path, 201, "hospital-a", RUN,
                   **{"approved-peers": _approved(tmp_path, "hospital-a", ["clinic-b", "lab-c"]),
                      "state-dir": str(tmp_path / "state" / "victim")})
    grid = InProcessGrid({201: victim, **sybils})
    out = _round(grid, [201, 301, 302], start, job="j2")
    assert out.new_arrays is None
    refusal = next(r for r in out.replies if r.node_id == 201)
    assert refusal.status == "unsafe" and "not signed by a key this organization approved" in refusal.reason
    assert ("train", 201) not in grid.log  # it never trained, never uploaded
    assert not PrivacyLedger(tmp_path / "state" / "victim", source="default", max_epsilon=20).counted


def test_a_cohort_needs_enough_distinct_organizations(tmp_path, start):
    names = ["hospital-a", "clinic-b/site-1", "clinic-b/site-2"]
    _keys(tmp_path, *names)

    def cohort(min_orgs: int, tag: str):
        nodes = {}
        for nid, name in zip((201, 202, 203), names, strict=True):
            nodes[nid] = _node(tmp_path, nid, name, RUN, **{
                "approved-peers": _approved(tmp_path, name, [n for n in names if n != name]),
                "secagg-min-organizations": min_orgs, "state-dir": str(tmp_path / tag / str(nid))})
        return _round(InProcessGrid(nodes), [201, 202, 203], start, job=tag)

    refused = cohort(3, "three")  # two organizations: clinic-b's two sites and hospital-a
    assert refused.new_arrays is None
    assert all(r.status == "unsafe" and "2 distinct organization(s)" in r.reason for r in refused.replies), [
        (r.status, r.reason) for r in refused.replies]
    assert cohort(2, "two").new_arrays is not None


def test_an_approved_federation_of_four_runs_three_dp_rounds(tmp_path, start):
    names = ["hospital-a", "clinic-b", "lab-c", "insurer-d"]
    _keys(tmp_path, *names)
    run = {**RUN, "privacy.enabled": True, "privacy.target-epsilon": 8.0, "train.rounds": 3}
    nodes = {200 + i: _node(tmp_path, 200 + i, name, run, **{"max-epsilon": 20.0,
                            "approved-peers": _approved(tmp_path, name, [n for n in names if n != name])})
             for i, name in enumerate(names)}
    grid, arrays = InProcessGrid(nodes), start
    for rnd in (1, 2, 3):
        out = _round(grid, sorted(nodes), arrays, rnd=rnd)
        assert out.new_arrays is not None, out.reason
        assert all(r.ok for r in out.replies)
        assert any(not np.array_equal(out.new_arrays[k], arrays[k]) for k in arrays)
        arrays = out.new_arrays
    for nid in nodes:  # three DP rounds on every organization's own ledger, under its ceiling
        ledger = PrivacyLedger(tmp_path / "state" / str(nid), source="default", max_epsilon=20)
        assert [e.round for e in ledger.counted] == [1, 2, 3] and 0 < ledger.spent() <= 8.0 + 1e-6


def test_a_deployed_node_without_approved_peers_takes_part_in_no_secure_aggregation(tmp_path, start):
    _keys(tmp_path, "a", "b", "c")
    nodes = {200 + i: _node(tmp_path, 200 + i, n, RUN) for i, n in enumerate("abc")}
    for n in nodes.values():
        n.context.node_config.pop("identity-key")
    out = _round(InProcessGrid(nodes), sorted(nodes), start)
    assert out.new_arrays is None
    assert all(r.status == "unsafe" and "no approved peers" in r.reason for r in out.replies)
    with pytest.raises(ConfigError, match="'approved-peers' needs 'identity-key'"):
        node_settings({"data-path": "/d.csv", "max-epsilon": 3, "approved-peers": str(tmp_path)}, 1)
    assert node_settings({"data-path": "/d.csv", "max-epsilon": 3, "approved-peers": "*"}, 1).any_peer
