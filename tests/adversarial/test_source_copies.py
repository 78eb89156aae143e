"""Attack: copying or renaming the data file starts a fresh budget.

Without an explicit source, a source used to be the file's resolved path: the same 500 records released under
three names composed to epsilon 13.3 against a ceiling of 8, with no warning. Now every job on a node spends
from one default budget, and records already released under one source name are refused under another.
"""

from __future__ import annotations

import shutil

import pytest
from fedtune.cli import main
from fedtune.client.app import make_client_app
from fedtune.common.errors import SourceConflict
from fedtune.common.privacy import accounting
from fedtune.common.privacy.ledger import DEFAULT_SOURCE, PrivacyLedger, open_all
from helpers import EASY_LABELS, LORA_RECIPE, small_settings, write_easy_csv
from scripted_server import ScriptedServer

LOCAL = [*(f"{k}={v}" for k, v in LORA_RECIPE.items()), "model.max-length=16", "train.local-steps=2", "train.batch-size=8", "data.max-records=0",
         f"data.labels={','.join(EASY_LABELS)}", "privacy.target-epsilon=5.5"]


def _local(tmp_path, data, *extra) -> int:
    return main(["local", "--data", str(data), "--state-dir", str(tmp_path / "state"), "--max-epsilon", "6",
                 "--out", str(tmp_path / "out"), *extra, *LOCAL])


def test_a_copied_or_renamed_file_spends_from_the_same_budget(tmp_path, capsys):
    a = write_easy_csv(tmp_path / "a.csv", n=80)
    assert _local(tmp_path, a) == 0
    copy = shutil.copy(a, tmp_path / "copy.csv")
    renamed = a.rename(tmp_path / "renamed.csv")
    for path in (copy, renamed):  # each would have been a fresh budget of 6
        capsys.readouterr()
        assert _local(tmp_path, path) == 3
        assert "privacy budget exceeded for data source 'default'" in capsys.readouterr().err
    (ledger,) = open_all(tmp_path / "state")
    assert ledger.source == DEFAULT_SOURCE and ledger.spent() <= 6.0
    assert [e.kind for e in ledger.counted] == ["train"]


def test_the_same_records_under_a_new_source_name_are_refused_unless_the_organization_says_otherwise(tmp_path, capsys):
    a = write_easy_csv(tmp_path / "a.csv", n=80)
    assert _local(tmp_path, a, "--source", "notes") == 0
    copy = shutil.copy(a, tmp_path / "copy.csv")
    capsys.readouterr()
    assert _local(tmp_path, copy, "--source", "notes-copy") == 1
    err = capsys.readouterr().err
    assert "already released under data source 'notes'" in err and "allow-shared-content" in err
    assert [lg.source for lg in open_all(tmp_path / "state") if lg.counted] == ["notes"]
    # the organization knows these are other people's records that happen to read the same: it says so
    assert _local(tmp_path, copy, "--source", "notes-copy", "--allow-shared-content") == 0
    # other content under a new name is a new source, as before
    assert _local(tmp_path, write_easy_csv(tmp_path / "b.csv", n=80, seed=5), "--source", "other") == 0


def test_a_deployed_node_refuses_a_copy_registered_as_a_new_source(tmp_path, minilm_easy):
    from fedtune.common.training import adapter

    a = write_easy_csv(tmp_path / "a.csv", n=80)
    copy = shutil.copy(a, tmp_path / "copy.csv")
    run = small_settings(**{"data.labels": ",".join(EASY_LABELS), "data.max-records": 0, "train.rounds": 2,
                            "fed.secure-aggregation": False})
    state = str(tmp_path / "state")
    arrays = adapter.pack(minilm_easy.model, ffa=False)
    first = ScriptedServer(make_client_app(), run_config=run,
                           node_config={"data-path": str(a), "state-dir": state, "max-epsilon": 8,
                                        "require-secure-aggregation": "off"})
    assert first.send("train", config={"job": "j1", "server-round": 1}, arrays=arrays).content["info"]["status"] == "ok"
    second = ScriptedServer(make_client_app(), run_config=run,
                            node_config={"data-path": str(copy), "source": "fresh", "state-dir": state,
                                         "max-epsilon": 8, "require-secure-aggregation": "off"})
    reply = second.send("train", config={"job": "j2", "server-round": 1}, arrays=arrays)
    assert reply.content["info"]["status"] == "error" and "already released under data source 'default'" in \
        reply.content["info"]["reason"]
    assert not PrivacyLedger(state, source="fresh", max_epsilon=8).counted


def test_an_old_nodes_implicit_file_budget_becomes_its_default_budget(tmp_path):
    """Before, a node without `source` spent under its file's resolved path: that spend is not lost."""
    state = tmp_path / "state"
    old = PrivacyLedger(state, source=str(tmp_path / "notes.csv"), max_epsilon=8)
    old.settle(old.reserve(job="old", round=1, kind="train", noise_multiplier=1.0, sample_rate=0.1, steps=50,
                           fingerprint="f" * 64, n_records=500))
    spent = old.spent()
    new = PrivacyLedger(state, source=DEFAULT_SOURCE, max_epsilon=8)
    entry = new.reserve(job="new", round=1, kind="train", noise_multiplier=1.0, sample_rate=0.1, steps=50,
                        fingerprint="f" * 64, n_records=500)  # same content: no conflict with what it took over
    assert new.epsilon_if() == pytest.approx(accounting.epsilon([(1.0, 0.1, 100)], delta=1e-5, kind="pld"))
    assert new.epsilon_if() > spent and entry.status == "reserved"
    assert [lg.source for lg in open_all(state)] == [DEFAULT_SOURCE]  # the old file is kept as *.migrated
    assert list((state / "ledger").glob("*.migrated"))


def test_the_conflict_check_reads_other_sources_only(tmp_path):
    state = tmp_path / "state"
    a = PrivacyLedger(state, source="a", max_epsilon=8)
    a.settle(a.reserve(job="j", round=1, kind="train", noise_multiplier=1.0, sample_rate=0.1, steps=5,
                       fingerprint="x" * 64, n_records=500))
    a.settle(a.reserve(job="j", round=2, kind="train", noise_multiplier=1.0, sample_rate=0.1, steps=5,
                       fingerprint="x" * 64, n_records=500))  # its own content again: fine
    b = PrivacyLedger(state, source="b", max_epsilon=8)
    with pytest.raises(SourceConflict):
        b.reserve(job="j", round=1, kind="train", noise_multiplier=1.0, sample_rate=0.1, steps=5,
                  fingerprint="x" * 64, n_records=500)
    assert not b.counted
