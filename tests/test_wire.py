"""The values a node and the server exchange: typed both ways, and nothing from the network trusted."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.common.errors import FedtuneError
from fedtune.common.operations.monitoring import node_privacy
from fedtune.common.operations.rundir import RoundRecord
from fedtune.common.operations.records import stored_figures
from fedtune.common.training.wire import EvalAnswer, NodeInfo, NodeRoundResult, RoundTask


def _result(**kw) -> NodeRoundResult:
    base = dict(update={"a": np.arange(3, dtype=np.float32)}, weight=64, epsilon=1.5, max_epsilon=8.0,
                delta=1e-5, noise_multiplier=0.9, sample_rate=0.05, steps=20)
    return NodeRoundResult(**{**base, **kw})


def test_a_round_result_survives_the_wire_and_secure_mode_keeps_update_and_weight_off_it():
    r = _result()
    rec = r.to_record()
    back = NodeRoundResult.from_record(rec["metrics"], rec["update"])
    assert back.figures() == r.figures() and np.array_equal(back.update["a"], r.update["a"])
    secure = r.to_record(secure=True)
    assert set(secure) == {"metrics"} and "weight" not in secure["metrics"]
    assert NodeRoundResult.from_record(secure["metrics"]).weight is None
    # the run directory's names are the field names; the wire's are dashed, spelled only in wire.py
    # no training loss and no timing: both are functions of the records with no noise on them
    assert set(r.figures()) == {"weight", "epsilon", "max_epsilon", "delta", "noise_multiplier", "sample_rate",
                                "steps"}
    assert {"max-epsilon", "noise-multiplier", "sample-rate"} <= set(rec["metrics"])
    assert not {"train-loss", "seconds"} & set(rec["metrics"])


@pytest.mark.parametrize("bad", ["8", float("nan"), float("inf"), True, None, [1.0]])
def test_a_lying_figure_becomes_no_figure(bad):
    m = {"weight": bad, "epsilon": bad, "steps": bad}
    r = NodeRoundResult.from_record(m)
    assert (r.weight, r.epsilon, r.steps) == (None, None, None)


@pytest.mark.parametrize("rec", [{}, {"job": "", "server-round": 1}, {"job": "j", "server-round": -1},
                                 {"job": "j", "server-round": "1"}, {"job": "j", "server-round": True},
                                 {"job": 3, "server-round": 1}, {"job": "x" * 201, "server-round": 1},
                                 {"job": "j", "server-round": 1, "audit-groups": "north"},
                                 {"job": "j", "server-round": 1, "audit-groups": ["a", "a"]},
                                 {"job": "j", "server-round": 1, "audit-groups": ["a", 3]},
                                 {"job": "j", "server-round": 1, "audit-groups": [""]},
                                 {"job": "j", "server-round": 1, "audit-groups": [str(i) for i in range(65)]}])
def test_a_node_refuses_a_malformed_round_instruction(rec):
    with pytest.raises(FedtuneError):
        RoundTask.from_record(rec)


def test_round_task_and_status_line_round_trip():
    assert RoundTask.from_record(RoundTask("job-1", 3).to_record()) == RoundTask("job-1", 3)
    audit = RoundTask("job-1", 3, groups=("north", "../../etc"))  # a group is a label, never a path
    assert RoundTask.from_record(audit.to_record()) == audit
    info = NodeInfo("hospital-a", "refused", "budget", "pld")
    assert NodeInfo.from_record(info.to_record(), "?") == info
    forged = NodeInfo.from_record({"node": "n" * 500, "status": "ok", "accountant": "made-up"}, "?")
    assert len(forged.name) == 200 and forged.accountant is None


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_an_evaluation_answer_round_trips_for_both_tasks(task):
    a = EvalAnswer(counts=(12.5, 3.25), noise_std=1.5, epsilon=2.0)
    back = EvalAnswer.from_record(a.to_record(task)["metrics"], task)
    assert back.counts == pytest.approx(a.counts) and back.noise_std == 1.5 and back.epsilon == 2.0
    assert set(a.figures(task)) == ({"correct", "wrong"} if task == "seq-cls" else {"records", "loss_sum"}) | {
        "noise_std", "epsilon"}


@pytest.mark.parametrize("cells", [[1.0, float("nan")], "1,2", [1.0, "2"], [True, 1.0]])
def test_a_malformed_audit_histogram_is_no_audit_but_the_counts_still_count(cells):
    good = EvalAnswer(counts=(4.0, 1.0), noise_std=1.0, epsilon=1.0, cells=(1.0, 2.0, 0.5, 1.5))
    assert EvalAnswer.from_record(good.to_record("seq-cls")["metrics"], "seq-cls") == good
    back = EvalAnswer.from_record({**good.to_record("seq-cls")["metrics"], "audit-cells": cells}, "seq-cls")
    assert back.cells == () and back.counts == (4.0, 1.0)


def test_run_directories_of_fedtune_0_1_with_dashed_keys_still_read():
    """Compatibility: per-node figures in rounds.jsonl used the wire's dashed keys before; both read the same."""
    old = {"status": "ok", "epsilon": 2.0, "max-epsilon": 8.0, "noise-multiplier": 0.9, "sample-rate": 0.05,
           "delta": 1e-5, "steps": 10, "train-loss": 0.5}
    new = {"status": "ok", **_result(epsilon=2.0, steps=10).figures()}
    assert stored_figures(old)["max_epsilon"] == 8.0 and stored_figures(old)["train_loss"] == 0.5
    # the run directory's reader maps them (RoundRecord.from_json, what RunDir.rounds() returns)
    a = node_privacy([RoundRecord.from_json({"round": 1, "per_node": {"n": old}})])["n"]
    b = node_privacy([RoundRecord.from_json({"round": 1, "per_node": {"n": new}})])["n"]
    for k in ("epsilon", "max_epsilon", "noise_multiplier", "sample_rate", "delta", "steps"):
        assert a[k] == b[k], k
