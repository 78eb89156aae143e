"""The node's privacy ledger: refuses past the ceiling, survives restarts and crashes."""

from __future__ import annotations

import json

import pytest
from conftest import EASY_LABELS, small_config

from common import adapter, node
from common.errors import BudgetExceededError, LedgerError
from common.ledger import PrivacyLedger


def _cfg(easy_csv, **extra):
    return small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                           "train.local-steps": 2, **extra})


def test_node_at_budget_refuses_also_after_restart(tmp_path, easy_csv, fresh_easy):
    # Prepare: a job that may spend epsilon 4 on a node whose ceiling is 4.5
    state = tmp_path / "state"
    cfg = _cfg(easy_csv, **{"privacy.target-epsilon": 4})
    n = node.prepare(cfg, state_dir=state, max_epsilon=4.5, model=fresh_easy)
    before = adapter.pack(fresh_easy.model, ffa=False)
    first = node.train_round(n, job="a", round=1)
    assert 3.9 <= first.epsilon_spent <= 4.0
    # Execute + Assert: a second job of the same size would pass the ceiling
    with pytest.raises(BudgetExceededError, match="ceiling 4.5") as err:
        node.train_round(n, job="b", round=1)
    assert "cannot be returned" in str(err.value)
    # a restart: a new process-like preparation from disk still sees the spent budget
    n2 = node.prepare(cfg, state_dir=state, max_epsilon=4.5, model=fresh_easy)
    assert n2.ledger.spent() == pytest.approx(first.epsilon_spent)
    trained = adapter.pack(fresh_easy.model, ffa=False)
    with pytest.raises(BudgetExceededError):
        node.train_round(n2, job="c", round=1)
    # refusing trained nothing and recorded nothing
    assert len(PrivacyLedger(state, dataset_id=n.splits.dataset_id, n_records=1, max_epsilon=4.5).entries) == 1
    after = adapter.pack(fresh_easy.model, ffa=False)
    assert all((after[k] == trained[k]).all() for k in after)
    assert any((trained[k] != before[k]).any() for k in before)


def test_crash_after_ledger_write_keeps_the_spend(tmp_path, easy_csv, fresh_easy, monkeypatch):
    state = tmp_path / "state"
    n = node.prepare(_cfg(easy_csv), state_dir=state, max_epsilon=10, model=fresh_easy)

    def crash(*a, **k):
        raise RuntimeError("power cut while packing the weights")

    monkeypatch.setattr(adapter, "pack", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        node.train_round(n, job="j", round=1)
    reopened = PrivacyLedger(state, dataset_id=n.splits.dataset_id, n_records=1, max_epsilon=10)
    assert len(reopened.entries) == 1 and reopened.entries[0].steps == 2
    assert reopened.spent() > 0


def test_dp_off_is_refused_under_a_finite_ceiling(tmp_path, easy_csv, fresh_easy):
    n = node.prepare(_cfg(easy_csv, **{"privacy.enabled": False}), state_dir=tmp_path, max_epsilon=100,
                     model=fresh_easy)
    with pytest.raises(BudgetExceededError, match="would bring it to inf"):
        node.train_round(n, job="j", round=1)


def test_unreadable_ledger_is_a_clear_error(tmp_path):
    lg = PrivacyLedger(tmp_path, dataset_id="ab" * 32, n_records=100, max_epsilon=5)
    lg.record(job="j", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10)
    lg.path.write_text(lg.path.read_text()[:40])
    with pytest.raises(LedgerError, match="never delete a ledger"):
        PrivacyLedger(tmp_path, dataset_id="ab" * 32, n_records=100, max_epsilon=5)


def test_ledger_file_is_complete_json_after_each_record(tmp_path):
    lg = PrivacyLedger(tmp_path, dataset_id="cd" * 32, n_records=1000, max_epsilon=50)
    for r in range(3):
        lg.record(job="j", round=r, noise_multiplier=1.1, sample_rate=0.05, steps=20)
        on_disk = json.loads(lg.path.read_text())
        assert len(on_disk["entries"]) == r + 1
    assert on_disk["delta"] == pytest.approx(1e-5)
    assert not list(lg.path.parent.glob("*.tmp*"))


def test_disk_cache_gives_the_same_node(tmp_path, easy_csv, fresh_easy):
    """A fresh process per message reuses tokenized data and the calibrated noise from the node's disk."""
    cfg = _cfg(easy_csv)
    cache = tmp_path / "cache"
    a = node.prepare(cfg, state_dir=tmp_path, max_epsilon=10, model=fresh_easy, cache_dir=cache)
    assert len(list(cache.glob("tokens-*.safetensors"))) == 1 and len(list(cache.glob("noise-*.json"))) == 1
    b = node.prepare(cfg, state_dir=tmp_path, max_epsilon=10, model=fresh_easy, cache_dir=cache)
    assert b.noise_multiplier == a.noise_multiplier
    for x, y in zip((a.train_set, a.val_set, a.test_set), (b.train_set, b.val_set, b.test_set)):
        assert all((s == t).all() for s, t in zip(x.tensors, y.tensors))
    # a lower ceiling on the node changes the calibration: not served from the cache
    c = node.prepare(cfg, state_dir=tmp_path, max_epsilon=2, model=fresh_easy, cache_dir=cache)
    assert c.noise_multiplier > a.noise_multiplier
