"""The fairness audit: per-group figures and gaps equal fairlearn's, through the real data and model path."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
import torch
from fedtune.common.errors import DataError
from fedtune.common.training import builder, data
from fedtune.common.training.config import load_config
from fedtune.common.training.evaluate import evaluate
from fedtune.common.training.fairness import audit
from helpers import EASY_LABELS, FINANCE, SPORT


def test_audit_by_hand_matches_fairlearn_and_one_vs_rest_for_many_classes():
    from fairlearn.metrics import MetricFrame, demographic_parity_difference, equalized_odds_difference
    from sklearn.metrics import accuracy_score

    gold = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    pred = np.array([0, 1, 0, 0, 1, 1, 1, 0])
    groups = ["a", "a", "b", "b", "b", "a", "a", "b"]
    f = audit(gold, pred, groups, ["no", "yes"])
    assert f["groups"]["a"] == {"accuracy": 0.75, "macro_f1": pytest.approx(0.7333333), "n": 4}
    assert f["groups"]["b"]["accuracy"] == 0.5 and f["accuracy_gap"] == 0.25 and f["worst_group"] == "b"
    assert f["accuracy_gap"] == MetricFrame(metrics=accuracy_score, y_true=gold, y_pred=pred,
                                            sensitive_features=groups).difference()
    assert f["demographic_parity_difference"] == demographic_parity_difference(gold, pred, sensitive_features=groups)
    assert f["equalized_odds_difference"] == equalized_odds_difference(gold, pred, sensitive_features=groups)
    # three classes: the largest one-vs-rest difference, with the class it comes from
    gold3, pred3 = np.array([0, 1, 2, 2, 1, 0]), np.array([0, 2, 2, 2, 1, 1])
    g3 = ["x", "x", "x", "y", "y", "y"]
    f3 = audit(gold3, pred3, g3, ["p", "q", "r"])
    per_class = [demographic_parity_difference((gold3 == c).astype(int), (pred3 == c).astype(int),
                                               sensitive_features=g3) for c in range(3)]
    assert f3["demographic_parity_difference"] == max(per_class)
    assert f3["demographic_parity_class"] == ["p", "q", "r"][int(np.argmax(per_class))]


def _grouped_csv(path, n=120, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "region"])
        for i in range(n):
            lab = EASY_LABELS[i % 2]
            w.writerow([f"{rng.choice(SPORT if lab == 'sport' else FINANCE)} on day {rng.randint(1, 30)}", lab,
                        "north" if rng.random() < 0.7 else "south"])
    return path


def test_the_server_evaluation_audits_groups_of_its_held_out_data(tmp_path, fresh_easy):
    csv_path = _grouped_csv(tmp_path / "g.csv")
    cfg = load_config({"data.path": str(csv_path), "data.labels": ",".join(EASY_LABELS), "data.group-column": "region",
                       "model.max-length": 24})
    splits = builder.load_records(cfg)
    assert len(splits.test.groups) == len(splits.test) and set(splits.test.groups) == {"north", "south"}
    test = data.tokenize(splits.test, fresh_easy.tokenizer, label_set=splits.labels, max_length=24)
    m = evaluate(fresh_easy.model, test, task="seq-cls", labels=splits.labels, batch_size=32,
                 groups=splits.test.groups)
    # independently: the model's own predictions, grouped by the file's column
    with torch.no_grad():
        fresh_easy.model.eval()
        pred = fresh_easy.model(input_ids=test.tensors[0], attention_mask=test.tensors[1]).logits.argmax(-1).numpy()
    assert m["fairness"] == audit(test.tensors[2].numpy(), pred, splits.test.groups, splits.labels)
    for g, v in m["fairness"]["groups"].items():
        idx = [i for i, x in enumerate(splits.test.groups) if x == g]
        assert v["n"] == len(idx) and v["accuracy"] == pytest.approx(float((pred[idx] == test.tensors[2].numpy()[idx]).mean()))
    with pytest.raises(DataError, match="data.group-column"):
        builder.load_records(cfg.replace(**{"data.group-column": "county"}))


def test_a_deployed_node_is_never_asked_for_the_group_column(tmp_path):
    from fedtune.client.node_config import node_settings

    ns = node_settings({"data-path": str(tmp_path / "d.csv"), "max-epsilon": 3, "state-dir": str(tmp_path)}, 1)
    cfg = load_config({"data.group-column": "region"})
    assert ns.apply(cfg).data.group_column == ""
