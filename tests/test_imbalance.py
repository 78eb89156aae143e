"""Skewed labels: the collapse warning fires, class weighting (from the server's labels) fixes it, nodes check weights."""

from __future__ import annotations

import csv
import math
import random

import pytest
from fedtune.common.errors import FedtuneError
from fedtune.common.training.imbalance import class_weights, learned_nothing, majority_baseline, what_to_try
from fedtune.common.training.node import NodePolicy, evaluate_split, prepare, train_round
from fedtune.common.training.wire import RoundTask
from helpers import FINANCE, SPORT, small_config


def _skewed_csv(path, n=300, share=0.85, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            lab = "sport" if rng.random() < share else "finance"
            w.writerow([f"{rng.choice(SPORT if lab == 'sport' else FINANCE)} on day {rng.randint(1, 30)}", lab])
    return path


def test_weights_baseline_and_warning_by_hand():
    labels = ["a"] * 83 + ["b"] * 17
    assert class_weights(labels, ["a", "b"], "auto") == pytest.approx([100 / (2 * 83), 100 / (2 * 17)])
    assert class_weights(["a", "b"] * 50, ["a", "b"], "auto") is None  # balanced labels: auto leaves the loss alone
    assert class_weights(["a", "b"] * 50, ["a", "b"], "balanced") == [1.0, 1.0]
    assert class_weights(labels, ["a", "b"], "none") is None
    mb = majority_baseline(labels, ["a", "b"])
    assert mb["label"] == "a" and mb["accuracy"] == 0.83 and mb["macro_f1"] == pytest.approx(2 * 0.83 / 1.83 / 2)
    collapsed = {"accuracy": 0.83, "macro_f1": 0.45, "per_class": {"a": {"predicted": 100}, "b": {"predicted": 0}}}
    assert "collapsed onto one class" in learned_nothing(collapsed, mb)
    weak = {"accuracy": 0.835, "macro_f1": 0.6, "per_class": {"a": {"predicted": 80}, "b": {"predicted": 20}}}
    assert "not above the majority-class baseline" in learned_nothing(weak, mb)
    good = {"accuracy": 0.95, "macro_f1": 0.9, "per_class": {"a": {"predicted": 82}, "b": {"predicted": 18}}}
    assert learned_nothing(good, mb) is None
    assert "class-weighting" in what_to_try(weighted=False) and "class-weighting" not in what_to_try(weighted=True)
    assert "head-only recipe" in what_to_try(weighted=True)  # a run that adapted the encoder is told about the head
    assert "head-only recipe" not in what_to_try(weighted=True, head_only=True)  # one that trained the head alone
    assert "lora.head-only=false" in what_to_try(weighted=True, head_only=True)  # ... is told about the encoder
    assert "model.pooling=mean" in what_to_try(weighted=True, head_only=True, pooling="cls")  # ... and the pooling
    assert "model.pooling=mean" not in what_to_try(weighted=True, head_only=True, pooling="mean")


@pytest.mark.slow
def test_collapse_is_flagged_and_class_weighting_fixes_it(tmp_path):
    # Prepare: 85% sport; a short training run that, unweighted, answers "sport" for everything
    csv_path = _skewed_csv(tmp_path / "skewed.csv")
    cfg = small_config(**{"data.path": str(csv_path), "data.labels": "sport,finance", "data.max-records": 0,
                          "train.local-steps": 15, "train.optimizer": "sgd", "train.lr": 0.3,
                          "privacy.enabled": False})
    results = {}
    for mode in ("none", "auto"):
        node = prepare(cfg, NodePolicy(source=mode, max_epsilon=math.inf), state_dir=tmp_path / mode)
        held = node.splits.val.labels + node.splits.test.labels  # stands in for the server's held-out data
        weights = class_weights(held, node.splits.labels, mode)
        # Execute
        train_round(node, job="j", round=1, federated=False, class_weights=weights)
        m = evaluate_split(node, "test")
        results[mode] = (weights, m, learned_nothing(m, majority_baseline(node.splits.test.labels, node.splits.labels)))
    # Assert: unweighted collapses and is flagged; auto weights the skewed labels and learns both classes
    assert results["none"][0] is None and "collapsed onto one class" in results["none"][2]
    weights, m, warning = results["auto"]
    assert weights[1] > 2 * weights[0] and warning is None
    assert m["macro_f1"] > results["none"][1]["macro_f1"] + 0.3 and m["per_class"]["finance"]["recall"] > 0.5


@pytest.mark.slow
def test_class_weights_leave_the_accounting_alone_and_a_node_checks_them(tmp_path):
    csv_path = _skewed_csv(tmp_path / "skewed.csv", n=160)
    cfg = small_config(**{"data.path": str(csv_path), "data.labels": "sport,finance", "data.max-records": 0})
    spent = []
    for i, weights in enumerate((None, [0.6, 3.0])):
        node = prepare(cfg, NodePolicy(source="s", max_epsilon=20), state_dir=tmp_path / f"n{i}")
        spent.append(train_round(node, job="j", round=1, federated=False, class_weights=weights).epsilon_spent)
    assert spent[0] == pytest.approx(spent[1], rel=1e-12)  # per-sample clipping bounds a record whatever its weight
    # a lying server: weights that do not fit the node's labels, or beyond the bounds, are refused before any spend
    for bad in ([1.0], [1.0, 500.0], [0.0, 1.0]):
        with pytest.raises(FedtuneError, match="class weights"):
            train_round(node, job="j2", round=1, federated=False, class_weights=bad)
    assert node.ledger.spent() == pytest.approx(spent[1])
    for rec in ({"job": "j", "server-round": 1, "class-weights": "1,2"},
                {"job": "j", "server-round": 1, "class-weights": [1.0, float("nan")]},
                {"job": "j", "server-round": 1, "class-weights": []}):
        with pytest.raises(FedtuneError, match="class weights"):
            RoundTask.from_record(rec)
    assert RoundTask.from_record({"job": "j", "server-round": 1, "class-weights": [0.5, 2.0]}).class_weights == (0.5, 2.0)
