"""An organization's own node settings: parsed strictly, and the server can never raise its ceiling."""

from __future__ import annotations

import pytest
from conftest import EASY_LABELS, small_config

from client.node_config import node_settings
from common import node
from common.errors import BudgetExceededError, ConfigError


def test_node_config_is_parsed_and_checked(tmp_path):
    cfg = small_config()
    ns = node_settings({"name": "hospital-a", "data-path": "/d.csv", "state-dir": str(tmp_path), "max-epsilon": 3,
                        "text-column": "body"}, 42, cfg, {})
    assert (ns.name, ns.max_epsilon, ns.data_path, ns.text_column, ns.partition) == (
        "hospital-a", 3.0, "/d.csv", "body", None)
    with pytest.raises(ConfigError) as e:
        node_settings({"data-path": "/d.csv", "max-epsiln": 3}, 1, cfg, {})
    assert "max-epsiln" in str(e.value) and "'max-epsilon': required" in str(e.value)


def test_server_cannot_raise_a_nodes_ceiling(tmp_path, easy_csv, fresh_easy):
    # the job (server's run config) asks for epsilon 8 and even sets a generous simulated ceiling ...
    cfg = small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "privacy.target-epsilon": 8, "sim.node-max-epsilon": 100, "train.rounds": 2})
    # ... but this organization's own node config says 2
    ns = node_settings({"state-dir": str(tmp_path), "max-epsilon": 2}, 7, cfg, {"run-dir": "/ignored"})
    assert ns.max_epsilon == 2
    n = node.prepare(cfg, state_dir=ns.state_dir, max_epsilon=ns.max_epsilon, model=fresh_easy)
    r1 = node.train_round(n, job="j", round=1)
    r2 = node.train_round(n, job="j", round=2)
    assert r2.epsilon_spent <= 2.0 + 1e-9  # noise was calibrated to the node's ceiling, not the job's 8
    with pytest.raises(BudgetExceededError, match="ceiling 2"):
        node.train_round(n, job="j", round=3)
    assert r1.epsilon_spent < r2.epsilon_spent
