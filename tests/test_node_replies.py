"""What leaves a node, read off its real ClientApp's replies to a scripted (curious) server."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedtune.client.app import make_client_app
from fedtune.common.privacy.ledger import PrivacyLedger
from fedtune.common.training import adapter, data
from helpers import EASY_LABELS, small_settings, write_easy_csv
from scripted_server import ScriptedServer, reply_values

HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"


def _node(tmp_path, csv, *, rounds=3, **run):
    run_config = small_settings(**{"data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                                   "train.rounds": rounds, **run})
    node_config = {"name": "clinic", "data-path": str(csv), "source": "clinic-notes", "state-dir": str(tmp_path / "s"),
                   "max-epsilon": 10.0,
                   "require-secure-aggregation": "off"}  # (these tests read plain replies; secure ones: test_secure_server)
    return ScriptedServer(make_client_app(), node_config=node_config, run_config=run_config)


def _exact_split(csv):
    return data.load_splits(path=str(csv), text_column="text", label_column="label", labels=EASY_LABELS,
                            task="seq-cls", val_fraction=0.1, test_fraction=0.2, seed=0)


def test_a_crafted_head_no_longer_reads_out_class_shares(tmp_path, minilm_easy):
    """Zero weights and a one-hot bias make the model answer 'sport' always: an exact answer would be the
    number of 'sport' records in the node's test split. Noised, accounted, and limited to the plan."""
    csv = write_easy_csv(tmp_path / "notes.csv", n=97)
    server = _node(tmp_path, csv)
    crafted = adapter.pack(minilm_easy.model, ffa=False)
    crafted[HEAD_W] = np.zeros_like(crafted[HEAD_W])
    crafted[HEAD_B] = np.array([20.0, -20.0], np.float32)  # EASY_LABELS[0] = "sport", always
    test = _exact_split(csv).test
    sport, n_test = sum(lab == "sport" for lab in test.labels), len(test)
    answers = []
    for rnd in (1, 2, 3):
        reply = server.send("evaluate", config={"job": "probe", "server-round": rnd}, arrays=crafted)
        m = dict(reply.content["metrics"])
        assert reply.content["info"]["status"] == "ok"
        answers.append((m["correct"], m["wrong"]))
        assert m["noise-std"] > 1.0  # calibrated Gaussian noise on each count
        assert m["correct"] != sport and m["correct"] + m["wrong"] != n_test  # never the exact figures
    assert len(set(answers)) == 3  # fresh noise every time: repeating the question does not average it away
    # every answer is a release in the source's ledger; the job's planned answers are used up after three
    ledger = PrivacyLedger(tmp_path / "s", source="clinic-notes", max_epsilon=10)
    assert [e.kind for e in ledger.counted] == ["eval"] * 3
    assert ledger.spent() > 0
    fourth = server.send("evaluate", config={"job": "probe", "server-round": 4}, arrays=crafted)
    assert fourth.content["info"]["status"] == "refused" and "metrics" not in fourth.content
    assert "3 planned eval release(s)" in fourth.content["info"]["reason"]


def test_a_node_that_says_evaluate_off_answers_nothing(tmp_path, minilm_easy):
    csv = write_easy_csv(tmp_path / "notes.csv")
    server = _node(tmp_path, csv)
    server.context.node_config["evaluate"] = "off"
    reply = server.send("evaluate", config={"job": "j", "server-round": 1},
                        arrays=adapter.pack(minilm_easy.model, ffa=False))
    assert reply.content["info"]["status"] == "error" and "evaluate=off" in reply.content["info"]["reason"]
    assert not (tmp_path / "s" / "ledger").exists() or not PrivacyLedger(
        tmp_path / "s", source="clinic-notes", max_epsilon=10).counted


def test_no_reply_carries_an_exact_record_count(tmp_path, minilm_easy):
    csv = write_easy_csv(tmp_path / "notes.csv", n=97)
    exact = _exact_split(csv)
    counts = {len(exact.train), len(exact.val), len(exact.test), exact.n_source,
              len(exact.train) + len(exact.val) + len(exact.test)}
    server = _node(tmp_path, csv, **{"fed.secure-aggregation": False})
    received = adapter.pack(minilm_easy.model, ffa=False)
    train = server.send("train", config={"job": "j", "server-round": 1}, arrays=received)
    evaluate = server.send("evaluate", config={"job": "j", "server-round": 1}, arrays=received)
    assert train.content["info"]["status"] == "ok" and evaluate.content["info"]["status"] == "ok"
    values = {**reply_values(train), **reply_values(evaluate)}
    whole = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and float(v).is_integer()}
    assert not {k: v for k, v in whole.items() if int(v) in counts}, (whole, counts)
    # the FedAvg weight is the planned training set (from the source's size, never the count that landed in
    # train) rounded up to whole batches, and delta is a round value
    assert values["metrics.weight"] == math.ceil(exact.planned_train / 8) * 8 != len(exact.train)
    assert values["metrics.delta"] == pytest.approx(1e-5)
