"""An organization's own node settings: parsed strictly, and no job can override what touches privacy."""

from __future__ import annotations

import logging

import pytest
from fedtune.client.node_config import node_settings
from fedtune.common.errors import BudgetExceededError, ConfigError, FedtuneError
from fedtune.common.training import node
from helpers import EASY_LABELS, small_config


def test_node_config_is_parsed_and_checked(tmp_path):
    ns = node_settings({"name": "hospital-a", "data-path": "/d.csv", "state-dir": str(tmp_path), "max-epsilon": 3,
                        "text-column": "body", "source": "notes-2026"}, 42)
    assert (ns.name, ns.max_epsilon, ns.data_path, ns.text_column, ns.partition) == (
        "hospital-a", 3.0, "/d.csv", "body", None)
    assert (ns.policy.source, ns.policy.delta, ns.policy.accountant, ns.policy.evaluate) == (
        "notes-2026", 1e-5, "pld", True)
    # without a source name the budget is the node's one default budget, whatever file it reads
    assert node_settings({"data-path": "/data/../d.csv", "max-epsilon": 3}, 1).policy.source == "default"
    assert node_settings({"data-path": "/other.csv", "max-epsilon": 3}, 1).policy.source == "default"
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
    ({"allow-shared-content": "perhaps"}, "'allow-shared-content': expected on or off"),
    ({"max-received-abs": 0}, "'max-received-abs': expected a finite number > 0"),
    ({"max-received-norm": float("inf")}, "'max-received-norm': expected a finite number > 0"),
    ({"max-received-abs": float("nan")}, "'max-received-abs': expected a finite number > 0"),
])
def test_node_config_values_out_of_range_are_refused(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        node_settings({"data-path": "/d.csv", "max-epsilon": 3, **bad}, 1)


def test_a_job_cannot_change_a_deployed_nodes_columns_or_task(caplog):
    ns = node_settings({"data-path": "/d.csv", "max-epsilon": 3, "text-column": "body", "label-column": "y"}, 1)
    cfg = small_config(**{"data.text-column": "secret_notes", "data.label-column": "diagnosis"})
    with caplog.at_level(logging.INFO, logger="fedtune.client.node_config"):
        run = ns.apply(cfg)
    assert (run.data.text_column, run.data.label_column) == ("body", "y")
    assert "ignoring data.text-column='secret_notes'" in caplog.text
    with pytest.raises(FedtuneError, match="this node's data is for seq-cls"):
        ns.apply(small_config(**{"model.task": "causal-lm"}))
    # an instruction-tuning node reads its own prompt and response columns, whatever the job names
    lm = node_settings({"data-path": "/d.jsonl", "max-epsilon": 3, "task": "causal-lm", "text-column": "question",
                        "response-column": "answer"}, 2)
    run = lm.apply(small_config(**{"model.task": "causal-lm", "data.text-column": "notes",
                                   "data.response-column": "diagnosis"}))
    assert (run.data.text_column, run.data.response_column) == ("question", "answer")


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


def _bundle(publisher="fedtune", name="fedtune", version=None, clientapp="fedtune.client.app:app") -> bytes:
    import io
    import zipfile

    from fedtune.client.guard import installed_version

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", f'[project]\nname = "{name}"\nversion = "{version or installed_version()}"\n'
                                     f'[tool.flwr.app]\npublisher = "{publisher}"\n'
                                     f'[tool.flwr.app.components]\nclientapp = "{clientapp}"\n')
        z.writestr("client/app.py", "raise SystemExit('this code must never run')\n")
    return buf.getvalue()


def test_the_app_guard_accepts_only_the_installed_fedtune_app():
    import hashlib

    from fedtune.client.guard import AppRefused, check_bundle, installed_version

    ok = _bundle()
    digest = hashlib.sha256(ok).hexdigest()
    assert check_bundle(ok, fab_id="fedtune/fedtune", fab_version=installed_version(), node_config={}) == digest
    assert check_bundle(ok, fab_id="fedtune/fedtune", fab_version=installed_version(),
                        node_config={"approved-apps": f"{'0' * 64}, {digest.upper()}"}) == digest
    cases = [
        (_bundle(publisher="intruder", name="evil"), "intruder/evil", None, {}, "not the fedtune app"),
        (_bundle(clientapp="evil.app:app"), "fedtune/fedtune", None, {}, "its ClientApp is 'evil.app:app'"),
        (_bundle(version="9.9.9"), "fedtune/fedtune", "9.9.9", {}, "it is fedtune 9.9.9, this node runs"),
        (ok, "fedtune/fedtune", None, {"approved-apps": "0" * 64}, "not among this node's approved-apps"),
        (b"not a zip", "fedtune/fedtune", None, {}, "unreadable"),
    ]
    for content, fab_id, version, conf, needle in cases:
        with pytest.raises(AppRefused, match=needle):
            check_bundle(content, fab_id=fab_id, fab_version=version or installed_version(), node_config=conf)


def test_fedtune_node_checks_its_setup_before_starting(tmp_path, capsys):
    from fedtune.cli import main

    key = tmp_path / "node.key"
    key.write_text("x")
    key.chmod(0o644)
    conf = tmp_path / "node.toml"
    conf.write_text('name = "a"\ndata-path = "/nonexistent.csv"\nmax-epsilon = 8.0\n')
    argv = ["node", "--superlink", "127.0.0.1:9092", "--ca", str(tmp_path / "ca.crt"), "--key", str(key),
            "--config", str(conf)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "ca.crt: no such file" in err and "chmod 600" in err and "Traceback" not in err
    (tmp_path / "ca.crt").write_text("x")
    key.chmod(0o600)
    assert main(argv) == 1
    assert "data-path /nonexistent.csv does not exist" in capsys.readouterr().err
    conf.write_text('name = "a"\ndata-path = "/d.csv"\nmax-epsilon = 8.0\nmax-epsiln = 3\n[table]\nx = 1\n')
    assert main(argv) == 1
    assert "tables are not node config keys" in capsys.readouterr().err
    conf.write_text('name = "a"\ndata-path = "/d.csv"\nmax-epsilon = -1\nroster = "/nowhere"\n')
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "'max-epsilon': expected > 0" in err and "'approved-peers': /nowhere does not exist" in err  # (roster: its earlier name)


@pytest.mark.parametrize("value,expected", [
    ("on", True), ("off", False), ("true", True), ("false", False), ("yes", True), ("no", False), ("1", True),
    ("0", False), (" ON ", True), ("False", False), (True, True), (False, False), (1, True), (0, False),
    ("maybe", None), ("2", None), (2, None), ("", None), (1.0, None)])
def test_node_and_job_configs_read_the_same_yes_no_spellings(value, expected):
    """One parser (config.parse_bool) for both: a spelling one accepts, the other accepts as the same value."""
    from fedtune.common.training.config import load_config

    try:
        job = load_config({"fed.server-eval": value}).fed.server_eval
    except ConfigError:
        job = None
    try:
        mine = node_settings({"data-path": "/d.csv", "max-epsilon": 3, "evaluate": value}, 1).policy.evaluate
    except ConfigError as e:
        assert "'evaluate': expected on or off (or true/false, yes/no, 1/0)" in str(e)
        mine = None
    assert job is mine is expected
