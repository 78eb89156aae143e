"""An organization's own node settings: parsed strictly, and no job can override what touches privacy."""

from __future__ import annotations

import logging

import pytest
from conftest import EASY_LABELS, small_config

from client.node_config import node_settings
from common import node
from common.errors import BudgetExceededError, ConfigError, FedtuneError


def test_node_config_is_parsed_and_checked(tmp_path):
    ns = node_settings({"name": "hospital-a", "data-path": "/d.csv", "state-dir": str(tmp_path), "max-epsilon": 3,
                        "text-column": "body", "source": "notes-2026"}, 42)
    assert (ns.name, ns.max_epsilon, ns.data_path, ns.text_column, ns.partition) == (
        "hospital-a", 3.0, "/d.csv", "body", None)
    assert (ns.policy.source, ns.policy.delta, ns.policy.accountant, ns.policy.evaluate) == (
        "notes-2026", 1e-5, "pld", True)
    # without a source name the budget belongs to the resolved data file
    assert node_settings({"data-path": "/data/../d.csv", "max-epsilon": 3}, 1).policy.source == "/d.csv"
    with pytest.raises(ConfigError) as e:
        node_settings({"data-path": "/d.csv", "max-epsiln": 3}, 1)
    assert "max-epsiln" in str(e.value) and "'max-epsilon': required" in str(e.value)


@pytest.mark.parametrize("bad,needle", [
    ({"delta": 0.5}, "'delta': expected 0 < delta <= 1e-3"),
    ({"delta": 0}, "'delta': expected 0 < delta <= 1e-3"),
    ({"accountant": "gdp"}, "'accountant': expected one of pld, rdp"),
    ({"evaluate": "maybe"}, "'evaluate': expected on or off"),
    ({"task": "ner"}, "'task': expected one of"),
    ({"data-path": ""}, "'data-path': required"),
])
def test_node_config_values_out_of_range_are_refused(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        node_settings({"data-path": "/d.csv", "max-epsilon": 3, **bad}, 1)


def test_a_job_cannot_change_a_deployed_nodes_columns_or_task(caplog):
    ns = node_settings({"data-path": "/d.csv", "max-epsilon": 3, "text-column": "body", "label-column": "y"}, 1)
    cfg = small_config(**{"data.text-column": "secret_notes", "data.label-column": "diagnosis"})
    with caplog.at_level(logging.INFO, logger="client.node_config"):
        run = ns.apply(cfg)
    assert (run.data.text_column, run.data.label_column) == ("body", "y")
    assert "ignoring data.text-column='secret_notes'" in caplog.text
    with pytest.raises(FedtuneError, match="this node's data is for seq-cls"):
        ns.apply(small_config(**{"model.task": "causal-lm"}))


def test_server_cannot_raise_a_nodes_ceiling(tmp_path, easy_csv, fresh_easy):
    # the job (server's run config) asks for epsilon 8 and even sets a generous simulated ceiling ...
    cfg = small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "privacy.target-epsilon": 8, "sim.node-max-epsilon": 100, "train.rounds": 2})
    # ... but this organization's own node config says 2
    ns = node_settings({"state-dir": str(tmp_path), "max-epsilon": 2, "data-path": str(easy_csv)}, 7)
    assert ns.max_epsilon == 2
    n = node.prepare(ns.apply(cfg), ns.policy, state_dir=ns.state_dir, model=fresh_easy)
    r1 = node.train_round(n, job="j", round=1, federated=False)
    r2 = node.train_round(n, job="j", round=2, federated=False)
    assert r2.epsilon_spent <= 2.0 + 1e-9  # noise was calibrated to the node's ceiling, not the job's 8
    with pytest.raises(BudgetExceededError):
        node.train_round(n, job="j", round=3, federated=False)
    assert r1.epsilon_spent < r2.epsilon_spent
