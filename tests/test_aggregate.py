"""Exact FedAvg arithmetic on tiny arrays (weighted, uniform, FFA-LoRA's exchanged subset)."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.common.training import adapter, aggregate


def test_weighted_fedavg_exact():
    g = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)}
    u1 = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([[3.0]], np.float32)}
    u2 = {"a": np.array([-1.0, 4.0], np.float32), "b": np.array([[0.0]], np.float32)}
    w = [aggregate.node_weight(30, "weighted"), aggregate.node_weight(10, "weighted")]
    new = aggregate.fedavg(g, [u1, u2], w)
    # a: 1 + (30*1 + 10*-1)/40 = 1.5 ; 2 + (0 + 40)/40 = 3 ; b: 0 + 90/40 = 2.25
    np.testing.assert_array_equal(new["a"], np.array([1.5, 3.0], np.float32))
    np.testing.assert_array_equal(new["b"], np.array([[2.25]], np.float32))
    assert new["a"].dtype == np.float32


def test_uniform_fedavg_exact():
    g = {"a": np.zeros(3, np.float32)}
    ups = [{"a": np.array([3.0, 0.0, 1.0], np.float32)}, {"a": np.array([0.0, 3.0, 2.0], np.float32)},
           {"a": np.array([0.0, 0.0, 3.0], np.float32)}]
    w = [aggregate.node_weight(n, "uniform") for n in (100, 1, 7)]
    np.testing.assert_array_equal(aggregate.fedavg(g, ups, w)["a"], np.array([1.0, 1.0, 2.0], np.float32))


def test_update_then_fedavg_of_one_node_is_that_node():
    received = {"k": np.array([0.5, -0.5], np.float32)}
    trained = {"k": np.array([0.75, -1.0], np.float32)}
    up = aggregate.update(trained, received)
    np.testing.assert_array_equal(up["k"], np.array([0.25, -0.5], np.float32))
    np.testing.assert_array_equal(aggregate.fedavg(received, [up], [5.0])["k"], trained["k"])


def test_ffa_aggregates_only_exchanged_tensors():
    keys = ["m.lora_A.weight", "m.lora_B.weight", "m.classifier.weight"]
    assert [k for k in keys if adapter.exchanged(k, ffa=True)] == ["m.lora_B.weight", "m.classifier.weight"]
    assert [k for k in keys if adapter.exchanged(k, ffa=False)] == keys
    g = {k: np.ones(2, np.float32) for k in keys if adapter.exchanged(k, ffa=True)}
    ups = [{k: np.full(2, v, np.float32) for k in g} for v in (1.0, 3.0)]
    new = aggregate.fedavg(g, ups, [1, 1])
    assert set(new) == set(g) and all((v == 3.0).all() for v in new.values())


def test_mismatched_updates_are_rejected():
    with pytest.raises(ValueError):
        aggregate.fedavg({"a": np.zeros(1)}, [{"a": np.zeros(1)}, {"b": np.zeros(1)}], [1, 1])
    with pytest.raises(ValueError):
        aggregate.fedavg({"a": np.zeros(1)}, [], [])


# -- the server's aggregation step (message exchange replaced by canned replies) ---------------
def _reply(name: str, update: dict | None, n: int = 10, status: str = "ok"):
    from fedtune import envelope
    from fedtune.common.training.wire import NodeInfo, NodeRoundResult
    from fedtune.server.messages import NodeReply

    result = NodeRoundResult(update=update, weight=n).to_record() if update is not None else {"metrics": {"weight": n}}
    content = envelope.reply(NodeInfo(name), result=result)
    return NodeReply(node_id=hash(name) & 0xFFFF, name=name, status=status, metrics={"weight": n},
                     content=content if status == "ok" else None)


def _run_round(monkeypatch, replies, min_nodes=2):
    import fedtune.server.aggregation as agg

    monkeypatch.setattr(agg, "exchange", lambda *a, **k: replies)
    g = {"w": np.zeros(2, np.float32)}
    return agg.PlainFedAvg(weighting="weighted", min_nodes=min_nodes, timeout=1).run_round(
        None, server_round=1, node_ids=[r.node_id for r in replies], global_arrays=g, config={}, names={})


def test_round_aggregates_the_good_replies_and_records_the_rest(monkeypatch):
    replies = [_reply("a", {"w": np.array([1.0, 1.0], np.float32)}, n=30),
               _reply("b", {"w": np.array([5.0, -3.0], np.float32)}, n=10),
               _reply("c", None, status="refused"),
               _reply("d", {"w": np.zeros(3, np.float32)})]  # wrong shape: rejected, not averaged
    out = _run_round(monkeypatch, replies)
    np.testing.assert_array_equal(out.new_arrays["w"], np.array([2.0, 0.0], np.float32))
    assert [(r.name, r.status) for r in out.replies if not r.ok] == [("c", "refused"), ("d", "error")]
    assert "malformed update" in out.replies[3].reason


def test_an_update_whose_bytes_do_not_decode_fails_its_node_not_the_round(monkeypatch):
    """A lying node's update record with bytes that are no array (here: a pickle header) used to raise out of the
    round and stop the server; now that node is failed and the others are averaged."""
    from flwr.app import Array, ArrayRecord

    bad = _reply("x", {"w": np.zeros(2, np.float32)})
    bad.content["update"] = ArrayRecord({"w": Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"junk")})
    replies = [_reply("a", {"w": np.array([1.0, 1.0], np.float32)}), _reply("b", {"w": np.array([3.0, 1.0],
                                                                                                   np.float32)}), bad]
    out = _run_round(monkeypatch, replies)
    np.testing.assert_array_equal(out.new_arrays["w"], np.array([2.0, 1.0], np.float32))
    assert [(r.name, r.status) for r in out.replies if not r.ok] == [("x", "error")]
    assert "malformed update (ValueError)" in out.replies[2].reason


def test_round_with_too_few_results_fails_and_keeps_the_model(monkeypatch):
    replies = [_reply("a", {"w": np.ones(2, np.float32)}), _reply("b", None, status="dropped")]
    out = _run_round(monkeypatch, replies, min_nodes=2)
    assert out.new_arrays is None and "only 1 of 2 nodes" in out.reason


def test_both_aggregations_fit_the_aggregator_seam():
    from fedtune.common.training.config import load_config
    from fedtune.server.aggregation import Aggregator, PlainFedAvg
    from fedtune.server.app import make_aggregator
    from fedtune.server.secure import SecureFedAvg

    secure = make_aggregator(load_config({}), out=lambda s: None)
    plain = make_aggregator(load_config({"fed.secure-aggregation": False}), out=lambda s: None)
    assert isinstance(secure, SecureFedAvg) and isinstance(plain, PlainFedAvg)
    assert isinstance(secure, Aggregator) and isinstance(plain, Aggregator)
    assert (secure.secure, plain.secure) == (True, False)
