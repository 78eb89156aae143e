"""The server's secure-aggregation step against faulty and lying parties, with real nodes (ClientApps)
in this process: malformed replies never crash it, a corrupted share is caught, and what it aggregates
equals plain FedAvg over the same nodes. Also: attacks by the server, refused and recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedtune.client.app import make_client_app
from fedtune.common.secagg import codec
from fedtune.common.secagg import protocol as sa
from fedtune.common.training import adapter
from fedtune.server.aggregation import PlainFedAvg
from fedtune.server.secure import SecureFedAvg
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from helpers import EASY_LABELS, LORA_RECIPE, small_settings, write_easy_csv
from scripted_server import InProcessGrid, ScriptedServer, task_identity

IDS = [101, 102, 103, 104, 105, 106]


def _nodes(tmp_path, tag: str, ids=IDS):
    run = small_settings(**{"data.labels": ",".join(EASY_LABELS), "data.max-records": 0, "train.local-steps": 1,
                            "privacy.enabled": False, "train.optimizer": "sgd", "train.lr": 0.5,
                            "fed.num-nodes": len(ids), "fed.min-nodes": 3})
    nodes = {}
    for i, nid in enumerate(ids):
        csv = write_easy_csv(tmp_path / f"data-{nid}.csv", n=40, seed=i)
        conf = {"name": f"org-{nid}", "data-path": str(csv), "state-dir": str(tmp_path / tag / str(nid)),
                "max-epsilon": float("inf")}
        if tag == "plain":  # the reference round is plain FedAvg, which these organizations allow
            conf["require-secure-aggregation"] = "off"
        else:  # these tests attack the protocol; peers approved by each organization: tests/adversarial
            conf["approved-peers"] = "*"
        nodes[nid] = ScriptedServer(make_client_app(), node_config=conf, run_config=run, node_id=nid)
    return nodes


def _secure() -> SecureFedAvg:
    return SecureFedAvg(weighting="weighted", min_nodes=3, timeout=60, clip=1.0, max_weight=1000, threshold=0.5,
                        degree=0)


def _round(agg, grid, start, ids=IDS):
    return agg.run_round(grid, server_round=1, node_ids=list(ids), global_arrays=start,
                         config={"job": "j", "server-round": 1}, names={})


@pytest.fixture
def start(minilm_easy, monkeypatch):
    task_identity(monkeypatch)
    return adapter.pack(minilm_easy.model, ffa=False)


def _plain(tmp_path, start, ids):
    out = _round(PlainFedAvg(weighting="weighted", min_nodes=3, timeout=60),
                 InProcessGrid({k: v for k, v in _nodes(tmp_path, "plain").items() if k in ids}), start, ids)
    assert out.new_arrays is not None, out.reason
    return out.new_arrays


def _close(a, b, n):
    step = 1.0 / sa.levels(n_nodes=n, max_weight=1000)  # one quantization step of the weighted mean
    moved = max(float(np.abs(b[k] - v).max()) for k, v in a.items())
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 2 * step, moved


def _edit(reply, record: str, **changes):
    rec = dict(reply.content.config_records[record])
    rec.update(changes)
    for k, v in list(rec.items()):
        if v is None:
            del rec[k]
    reply.content[record] = ConfigRecord(rec)
    return reply


def test_the_secure_sum_equals_plain_fedavg_over_the_same_nodes(tmp_path, start):
    out = _round(_secure(), InProcessGrid(_nodes(tmp_path, "secure")), start)
    assert out.new_arrays is not None, out.reason
    assert out.exchanges == 4 and out.extra["cohort"] == 6 and out.extra["dropped"] == []
    _close(out.new_arrays, _plain(tmp_path, start, IDS), 6)


@pytest.mark.parametrize("fault", ["missing-keys", "wrong-length", "bad-signature", "garbage-shares"])
def test_a_malformed_upload_marks_that_node_failed_and_the_round_goes_on(tmp_path, start, fault):
    victim = IDS[2]

    def tamper(msg, reply):
        if msg.metadata.message_type != "train" or msg.metadata.dst_node_id != victim:
            return reply
        if fault == "missing-keys":
            return _edit(reply, "secagg", commit=None, **{"shares-ids": None})
        if fault == "wrong-length":
            masked = reply.content.array_records["masked"]["masked"].numpy()
            reply.content["masked"] = ArrayRecord({"masked": Array(masked[:-7].copy())})
            return reply
        if fault == "bad-signature":
            return _edit(reply, "secagg", sig=b"\x00" * 64)
        return _edit(reply, "secagg", **{"shares-blobs": ["not bytes"]})

    out = _round(_secure(), InProcessGrid(_nodes(tmp_path, "secure"), tamper), start)
    assert out.new_arrays is not None, out.reason
    bad = [r for r in out.replies if not r.ok]
    assert [r.node_id for r in bad] == [victim] and bad[0].status == "error"
    assert out.extra["dropped"] == [f"org-{victim}"] and out.exchanges == 5  # + the consistency check
    survivors = [i for i in IDS if i != victim]
    _close(out.new_arrays, _plain(tmp_path, start, survivors), 6)


def test_a_malformed_unmask_answer_is_ignored(tmp_path, start):
    def tamper(msg, reply):
        if msg.metadata.message_type == "query.secagg_unmask" and msg.metadata.dst_node_id == IDS[0]:
            return _edit(reply, "secagg", **{"b-ids": "garbage", "b-blobs": [1, 2]})
        return reply

    out = _round(_secure(), InProcessGrid(_nodes(tmp_path, "secure"), tamper), start)
    assert out.new_arrays is not None, out.reason  # 5 neighbours, t = 3: the other answers suffice
    assert [(r.node_id, r.reason[:17]) for r in out.later] == [(IDS[0], "unusable shares: ")]
    _close(out.new_arrays, _plain(tmp_path, start, IDS), 6)


def test_a_corrupted_self_mask_share_is_detected(tmp_path, start):
    """With spare shares the server finds a subset that matches the node's commitment; with exactly t, one
    corrupted share fails the round cleanly instead of silently corrupting the model."""
    ids = IDS[:4]  # complete graph: 3 neighbours, t = 2

    def corrupt(holder, owner):
        def tamper(msg, reply):
            if msg.metadata.message_type == "query.secagg_unmask" and msg.metadata.dst_node_id == holder:
                rec = reply.content.config_records["secagg"]
                b = codec.map_from_wire(rec, "b")
                b[owner] = b[owner][:4] + bytes([b[owner][4] ^ 0xFF]) + b[owner][5:]
                return _edit(reply, "secagg", **codec.map_to_wire("b", b))
            return reply
        return tamper

    out = _round(_secure(), InProcessGrid(_nodes(tmp_path, "spare", ids), corrupt(ids[0], ids[1])), start, ids)
    assert out.new_arrays is not None, out.reason  # 3 shares of ids[1]'s seed, t = 2: a good pair exists
    _close(out.new_arrays, _plain(tmp_path, start, ids), 4)

    def corrupt_and_drop(msg, reply):  # ids[3] does not answer the unmask request: exactly t shares remain
        if msg.metadata.message_type == "query.secagg_unmask" and msg.metadata.dst_node_id == ids[3]:
            return None
        return corrupt(ids[0], ids[1])(msg, reply)

    failed = _round(_secure(), InProcessGrid(_nodes(tmp_path, "exact", ids), corrupt_and_drop), start, ids)
    assert failed.new_arrays is None and "corrupted share" in failed.reason


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["lowered-threshold", "different-max-weight"])
def test_a_lying_server_is_refused_and_the_refusals_are_recorded(tmp_path, monkeypatch, attack):
    """Real nodes in Flower's simulation engine (their code untouched); the server side is made to lie."""
    import fedtune.server.secure as secure
    from fedtune.common.training.config import load_config
    from fedtune.simulations.run import simulate

    if attack == "lowered-threshold":
        honest = secure.SecureFedAvg._propose

        def propose(self, job, cohort, server_round):
            import dataclasses

            return dataclasses.replace(honest(self, job, cohort, server_round), threshold=1)

        monkeypatch.setattr(secure.SecureFedAvg, "_propose", propose)
    else:
        real_exchange = secure.exchange

        def exchange(grid, *, node_ids, message_type, content, **kw):
            if message_type != "train":
                return real_exchange(grid, node_ids=node_ids, message_type=message_type, content=content, **kw)
            first = min(node_ids)

            def per_node(nid):  # every node but one is told max-weight 1: the 'sum' would be that node's update
                msg = dict(content)
                rec = dict(msg["secagg"])
                if nid != first:
                    rec["p-max_weight"] = 1
                msg["secagg"] = ConfigRecord(rec)
                return RecordDict(msg)

            return real_exchange(grid, node_ids=node_ids, message_type=message_type, content=per_node, **kw)

        monkeypatch.setattr(secure, "exchange", exchange)
        monkeypatch.setattr(secure.sa, "check_upload", lambda *a: None)  # the lying server checks nothing itself
    run_dir = tmp_path / "run"
    cfg = load_config({**LORA_RECIPE, "data.max-records": 240, "model.max-length": 16, "train.local-steps": 1,
                       "train.batch-size": 8, "sim.partitioner": "iid", "fed.num-nodes": 4, "fed.min-nodes": 3,
                       "train.rounds": 1, "fed.run-dir": str(run_dir), "fed.node-wait-timeout": 120,
                       "fed.fraction-evaluate": 0})
    simulate(cfg, out=lambda s: None, report=False)
    (rnd,) = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert rnd["status"] == "failed"  # the model did not change
    refusals = [f for f in rnd["failures"] if f["status"] == "unsafe"]
    assert len(refusals) == 4, rnd["failures"]
    if attack == "lowered-threshold":
        assert all("not a strict majority" in f["reason"] for f in refusals), refusals
    else:  # the node told the truth sees others' signatures over other parameters; the others see theirs altered
        assert all("did not sign this round's parameters" in f["reason"] or "not the ones this node masked with"
                   in f["reason"] for f in refusals), refusals
        assert any("did not sign this round's parameters" in f["reason"] for f in refusals)


def test_a_node_says_locally_when_the_clip_cuts_its_update(tmp_path, start, caplog):
    import logging

    ids = IDS[:3]
    tight = SecureFedAvg(weighting="weighted", min_nodes=3, timeout=60, clip=0.001, max_weight=1000, threshold=0.5,
                         degree=0)
    with caplog.at_level(logging.WARNING, logger="fedtune.client.secure_node"):
        out = _round(tight, InProcessGrid(_nodes(tmp_path, "tight", ids)), start, ids)
    assert out.new_arrays is not None, out.reason
    cut = [r.getMessage() for r in caplog.records if "exceed the secure-aggregation clip 0.001" in r.getMessage()]
    assert len(cut) == 3 and all("raise fed.secagg-clip" in m for m in cut)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedtune.client.secure_node"):
        _round(_secure(), InProcessGrid(_nodes(tmp_path, "loose", ids)), start, ids)
    assert not any("secure-aggregation clip" in r.getMessage() for r in caplog.records)


def test_replies_are_collected_after_the_server_worked_and_a_silent_node_is_dropped_at_the_deadline(tmp_path,
                                                                                                 start):
    """The federated evaluation is posted first and collected after the server's own evaluation: replies that
    arrived meanwhile are read, a node that never answers is 'dropped' once the deadline has passed."""
    import time

    from fedtune import envelope
    from fedtune.server.messages import collect, post

    nodes = _nodes(tmp_path, "eval")
    grid = InProcessGrid(nodes, tamper=lambda msg, reply: None if msg.metadata.dst_node_id == IDS[0] else reply)
    content = envelope.request(arrays=start, task={"job": "j", "server-round": 1})
    t0 = time.monotonic()
    pending = post(grid, node_ids=IDS, message_type="evaluate", content=content, timeout=1.0, group="eval-1")
    replies = collect(grid, pending, names={})
    waited = time.monotonic() - t0
    status = {r.node_id: r.status for r in replies}
    assert status == {IDS[0]: "dropped", **{nid: "ok" for nid in IDS[1:]}}
    assert all("correct" in r.metrics for r in replies if r.ok)  # the nodes' (noised) evaluation answers
    assert 1.0 <= waited < 30  # waited for the silent node until the deadline, not for ever
