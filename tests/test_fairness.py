"""The fairness audit: per-group figures and gaps equal fairlearn's, through the real data and model path."""

from __future__ import annotations

import copy
import csv
import math
import random

import numpy as np
import pytest
import torch
from fedtune.common.errors import DataError
from fedtune.common.training import builder, data
from fedtune.common.training.config import load_config
from fedtune.common.training.evaluate import evaluate
from fedtune.common.training.fairness import audit, node_cells, pool_cells
from helpers import EASY_LABELS, FINANCE, LORA_RECIPE, SPORT, small_config, small_settings


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
    cfg = load_config({**LORA_RECIPE, "data.path": str(csv_path), "data.labels": ",".join(EASY_LABELS), "data.group-column": "region",
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


def test_a_deployed_node_audits_only_the_group_column_its_own_config_names(tmp_path):
    from fedtune.client.node_config import node_settings

    conf = {"data-path": str(tmp_path / "d.csv"), "max-epsilon": 3, "state-dir": str(tmp_path)}
    cfg = load_config({**LORA_RECIPE, "data.group-column": "region"})
    assert node_settings(conf, 1).apply(cfg).data.group_column == ""  # the job cannot make a node read a column
    assert node_settings({**conf, "group-column": "site"}, 1).apply(cfg).data.group_column == "site"


def _predictions(lora, dataset) -> np.ndarray:
    with torch.no_grad():
        lora.model.eval()
        return lora.model(input_ids=dataset.tensors[0], attention_mask=dataset.tensors[1]).logits.argmax(-1).numpy()


def test_pooled_node_histograms_audit_like_fairlearn_on_the_pooled_records():
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    rng = np.random.default_rng(3)
    asked = ("north", "south")
    nodes = []
    for n in (30, 50):
        gold, pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
        groups = rng.choice(["north", "south", "west"], n, p=[0.5, 0.3, 0.2])  # west: not on the server's list
        nodes.append((gold, pred, groups))
    pooled = pool_cells([node_cells(g, p, grp, asked, 2) for g, p, grp in nodes], asked, EASY_LABELS)
    gold, pred, groups = (np.concatenate(x) for x in zip(*nodes))
    keep = groups != "west"
    assert pooled["other_records"] == float((~keep).sum()) and pooled["nodes"] == 2 and pooled["noised"]
    direct = audit(gold[keep], pred[keep], groups[keep].tolist(), EASY_LABELS)
    for k in ("accuracy_gap", "macro_f1_gap", "demographic_parity_difference", "equalized_odds_difference"):
        assert pooled[k] == pytest.approx(direct[k]), k
    assert pooled["groups"] == {g: {**v, "macro_f1": pytest.approx(v["macro_f1"])} for g, v in direct["groups"].items()}
    assert pooled["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(gold[keep], pred[keep], sensitive_features=groups[keep]))
    assert pooled["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(gold[keep], pred[keep], sensitive_features=groups[keep]))
    # a histogram of the wrong shape (a node that lies or is out of date) is left out, not trusted
    assert pool_cells([np.ones(5)], asked, EASY_LABELS) is None


def test_a_node_audit_answer_is_its_histogram_and_costs_exactly_what_plain_counts_cost(tmp_path, fresh_easy):
    from fedtune.common.privacy.ledger import PrivacyLedger
    from fedtune.common.training import node
    from fedtune.common.training.evaluate import private_counts

    csv_path = _grouped_csv(tmp_path / "g.csv", n=160)
    base = {**LORA_RECIPE, "data.path": str(csv_path), "data.labels": ",".join(EASY_LABELS), "data.group-column": "region",
            "data.max-records": 0}
    # without DP the answer is exact: the node's own per-group confusion histogram
    n = node.prepare(small_config(**base, **{"privacy.enabled": False}), node.NodePolicy(source="g", max_epsilon=math.inf),
                     state_dir=tmp_path / "plain", model=fresh_easy)
    a = node.answer_evaluation(n, job="j", round=1, groups=("north",))  # south is not on the server's list
    gold, pred, grp = n.test_set.tensors[2].numpy(), _predictions(n.lora, n.test_set), np.array(n.splits.test.groups)
    cells = np.array(a.cells).reshape(2, 2, 2)
    for y in range(2):
        for p in range(2):
            assert cells[0, y, p] == np.sum((grp == "north") & (gold == y) & (pred == p))
            assert cells[1, y, p] == np.sum((grp == "south") & (gold == y) & (pred == p))  # the "other" row
    assert a.counts == tuple(private_counts(n.lora.model, n.test_set, task="seq-cls", batch_size=32))
    # with DP: the histogram gets the same noise and the same ledger entry as the two plain counts
    answers, ledgers = [], []
    for tag, groups in (("audit", ("north", "south")), ("counts", ())):
        dp = node.prepare(small_config(**base), node.NodePolicy(source="g", max_epsilon=20), state_dir=tmp_path / tag,
                          model=copy.deepcopy(fresh_easy))
        answers.append(node.answer_evaluation(dp, job="j", round=1, groups=groups))
        ledgers.append(PrivacyLedger(tmp_path / tag, source="g", max_epsilon=20).counted)
    audited, plain = answers
    assert len(audited.cells) == 3 * 2 * 2 and not plain.cells and audited.noise_std == plain.noise_std > 0
    assert [e.event for e in ledgers[0]] == [e.event for e in ledgers[1]] and len(ledgers[0]) == 1
    assert audited.epsilon == plain.epsilon
    exact = node_cells(gold, pred, grp, ("north", "south"), 2)
    assert not np.allclose(audited.cells, exact)  # noised, never the exact histogram


def test_nodes_audit_through_their_client_apps_and_the_server_pools_the_answers(tmp_path, minilm_easy, monkeypatch):
    """Real ClientApps (deployed node configs, DP off so the answers are exact): the node whose own config
    names the group column answers with a histogram, the other with plain counts; the server's pooled
    audit equals fairlearn on the auditing nodes' records, recomputed independently."""
    from fedtune.client.app import make_client_app
    from fedtune.client.node_config import node_settings
    from fedtune.common.training import adapter, node
    from fedtune.common.training.wire import RoundTask
    from fedtune.server.federation import Federation
    from fedtune import envelope
    from fedtune.server.messages import post
    from scripted_server import InProcessGrid, ScriptedServer, task_identity

    task_identity(monkeypatch)
    run = small_settings(**{"data.labels": ",".join(EASY_LABELS), "data.max-records": 0, "privacy.enabled": False,
                            "data.group-column": "region"})
    confs, nodes = {}, {}
    for i, nid in enumerate((11, 12, 13)):
        confs[nid] = {"name": f"org-{nid}", "data-path": str(_grouped_csv(tmp_path / f"{nid}.csv", n=100, seed=i)),
                      "state-dir": str(tmp_path / str(nid)), "max-epsilon": math.inf}
        if nid != 13:
            confs[nid]["group-column"] = "region"
        nodes[nid] = ScriptedServer(make_client_app(), node_config=confs[nid], run_config=run, node_id=nid)
    start = adapter.pack(minilm_easy.model, ffa=False)
    asked = ("north", "south")
    content = envelope.request(arrays=start, task=RoundTask(job="j", round=1, groups=asked).to_record())
    grid = InProcessGrid(nodes)
    fed = Federation(load_config(run), run_dir=None, aggregator=None)
    fed.audit_groups, fed.labels = asked, list(EASY_LABELS)
    pending = post(grid, node_ids=list(nodes), message_type="evaluate", content=content, timeout=60, group="eval-1")
    pooled = fed._collect_federated_eval(grid, pending)
    assert pooled["nodes"] == 3 and pooled["fairness"]["nodes"] == 2  # node 13 answered plain counts only
    # independently: each auditing node's test split and the model's predictions on it
    gold, pred, grp = [], [], []
    for nid in (11, 12):
        ns = node_settings(confs[nid], nid)
        n = node.prepare(ns.apply(load_config(run)), ns.policy, state_dir=tmp_path / "check" / str(nid),
                         data_path=ns.data_path, model=copy.deepcopy(minilm_easy))
        adapter.unpack(n.lora.model, start, ffa=False)
        gold.append(n.test_set.tensors[2].numpy())
        pred.append(_predictions(n.lora, n.test_set))
        grp += n.splits.test.groups
    direct = audit(np.concatenate(gold), np.concatenate(pred), grp, EASY_LABELS)
    got = pooled["fairness"]
    assert {g: v["n"] for g, v in got["groups"].items()} == {g: v["n"] for g, v in direct["groups"].items()}
    for k in ("accuracy_gap", "demographic_parity_difference", "equalized_odds_difference"):
        assert got[k] == pytest.approx(direct[k]), k
    assert got["other_records"] == 0.0


def test_a_node_whose_test_split_is_empty_answers_the_audit_with_noised_zeros(tmp_path, fresh_easy):
    """Found when splits became per-record: a small node's test split can be empty, and the audit path crashed
    (argmax of an empty sequence) where the plain counts answered. Whether a split is empty depends on the
    records, so the crash was a refusal that depended on them; now both answer."""
    from fedtune.common.training import node

    csv_path = _grouped_csv(tmp_path / "g.csv", n=60)
    cfg = small_config(**{"data.path": str(csv_path), "data.labels": ",".join(EASY_LABELS),
                          "data.group-column": "region", "data.max-records": 0, "privacy.enabled": False})
    full = builder.load_records(cfg)
    splits = data.Splits(full.train, full.val, full.test.subset([]), full.labels, full.fingerprint, full.n_source,
                         full.train_share)
    n = node.prepare(cfg, node.NodePolicy(source="g", max_epsilon=math.inf), state_dir=tmp_path / "s",
                     model=fresh_easy, splits=splits)
    for groups in (("north", "south"), ()):
        a = node.answer_evaluation(n, job="j", round=1, groups=groups)
        assert a.counts == (0.0, 0.0) and all(c == 0 for c in a.cells)


@pytest.mark.slow
def test_a_simulation_audits_the_nodes_and_reports_it(tmp_path):
    """Through Flower's simulation engine with secure aggregation (DP off, so the answers are exact): every
    simulated node answers the audit with its histogram, and the pooled figures reach rounds.jsonl,
    summary.json and the report."""
    import json
    from collections import Counter

    from fedtune.common.training.federated_data import node_splits
    from fedtune.simulations.run import simulate

    run_dir = tmp_path / "run"
    cfg = load_config({**LORA_RECIPE, "data.path": str(_grouped_csv(tmp_path / "g.csv", n=240)), "data.labels": ",".join(EASY_LABELS),
                       "data.group-column": "region", "data.max-records": 0, "model.max-length": 16,
                       "train.local-steps": 2, "train.batch-size": 8, "train.rounds": 1, "sim.partitioner": "iid",
                       "privacy.enabled": False, "sim.node-max-epsilon": float("inf"),
                       "fed.num-nodes": 3, "fed.min-nodes": 3, "fed.run-dir": str(run_dir),
                       "fed.node-wait-timeout": 120, "fed.round-timeout": 300})
    res = simulate(cfg, out=lambda s: None)
    fe = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[0])["federated_eval"]
    fair = fe["fairness"]
    assert fe["nodes"] == 3 and fair["nodes"] == 3 and fair["other_records"] == 0
    truth = Counter(g for i in range(3) for g in node_splits(cfg, i, 3).test.groups)  # the nodes' test records
    assert {g: v["n"] for g, v in fair["groups"].items()} == dict(truth)
    assert res["summary"]["federated_eval"]["fairness"] == fair
    assert "nodes' own test splits" in (run_dir / "report.md").read_text()
