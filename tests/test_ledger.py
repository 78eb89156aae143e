"""The node's privacy ledger: one budget per data source, whatever a job asks; reserve, then train.

Each test attacks the ceiling the way a job (or a curious server choosing job settings) would:
changed settings, a refreshed file, two trainings at once, a crash mid-training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedtune.common.errors import BudgetExceededError, ConfigError, LedgerError, PrivacyError
from fedtune.common.privacy import accounting as privacy
from fedtune.common.privacy.ledger import PrivacyLedger, legacy_files, open_all
from fedtune.common.training import adapter, node
from fedtune.common.training.config import load_config
from helpers import EASY_LABELS, small_config, write_easy_csv

ROOT = Path(__file__).resolve().parents[1]


def _cfg(csv, **extra):
    return small_config(**{"data.path": str(csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                           "train.local-steps": 2, **extra})


def _policy(ceiling: float, source: str = "clinic-notes", **kw) -> node.NodePolicy:
    return node.NodePolicy(source=source, max_epsilon=ceiling, **kw)


def test_node_at_budget_refuses_also_after_restart(tmp_path, easy_csv, fresh_easy):
    # Prepare: a job that may spend epsilon 4 on a node whose ceiling is 4.5
    state = tmp_path / "state"
    cfg = _cfg(easy_csv, **{"privacy.target-epsilon": 4})
    n = node.prepare(cfg, _policy(4.5), state_dir=state, model=fresh_easy)
    before = adapter.pack(fresh_easy.model, ffa=False)
    first = node.train_round(n, job="a", round=1, federated=False)
    assert 3.9 <= first.epsilon_spent <= 4.0
    # Execute + Assert: a second job of the same size would pass the ceiling
    with pytest.raises(BudgetExceededError, match="ceiling 4.5") as err:
        node.train_round(n, job="b", round=1, federated=False)
    assert "cannot be returned" in str(err.value)
    # a restart: a new process-like preparation from disk still sees the spent budget
    n2 = node.prepare(cfg, _policy(4.5), state_dir=state, model=fresh_easy)
    assert n2.ledger.spent() == pytest.approx(first.epsilon_spent)
    trained = adapter.pack(fresh_easy.model, ffa=False)
    with pytest.raises(BudgetExceededError):
        node.train_round(n2, job="c", round=1, federated=False)
    # a job that asks for what is left still fits
    small = node.prepare(_cfg(easy_csv, **{"privacy.target-epsilon": 0.3}), _policy(4.5), state_dir=state,
                         model=fresh_easy)
    assert node.train_round(small, job="d", round=1, federated=False).epsilon_spent <= 4.5
    # refusing trained nothing and spent nothing
    reopened = PrivacyLedger(state, source="clinic-notes", max_epsilon=4.5)
    assert [e.job for e in reopened.counted] == ["a", "d"]
    assert any((trained[k] != before[k]).any() for k in before)


@pytest.mark.parametrize("variation", ["append-a-record", "subsample", "columns", "labels-order", "rename-file"])
def test_the_ceiling_holds_whatever_the_job_reads_from_the_source(tmp_path, fresh_easy, variation):
    """The budget belongs to the named source: new file content or other job settings never fork it."""
    csv = write_easy_csv(tmp_path / "notes.csv")
    state, ceiling = tmp_path / "state", 4.0
    cfg = _cfg(csv, **{"privacy.target-epsilon": 3.5})
    n = node.prepare(cfg, _policy(ceiling), state_dir=state, model=fresh_easy)
    first = node.train_round(n, job="first", round=1, federated=False)
    assert first.epsilon_spent > 3.4
    # the organization refreshes its data, or the next job asks for other settings
    if variation == "append-a-record":
        with open(csv, "a", encoding="utf-8") as f:
            f.write("the striker scored again on day 31,sport\n")
        cfg2 = cfg
    elif variation == "subsample":
        cfg2 = cfg.replace(**{"data.subsample": 0.8})
    elif variation == "columns":
        rows = csv.read_text(encoding="utf-8").splitlines()
        (tmp_path / "cols.csv").write_text("\n".join(["body,topic"] + rows[1:]) + "\n", encoding="utf-8")
        cfg2 = cfg.replace(**{"data.path": str(tmp_path / "cols.csv"), "data.text-column": "body",
                              "data.label-column": "topic"})
    elif variation == "labels-order":
        cfg2 = cfg.replace(**{"data.labels": ",".join(reversed(EASY_LABELS))})
    else:
        csv.rename(tmp_path / "renamed.csv")
        cfg2 = cfg.replace(**{"data.path": str(tmp_path / "renamed.csv")})
    n2 = node.prepare(cfg2, _policy(ceiling), state_dir=state, model=fresh_easy)
    assert n2.ledger.path == n.ledger.path  # the same budget
    # Execute + Assert: a second job of the same size is refused before training: no fresh budget
    with pytest.raises(BudgetExceededError, match="data source 'clinic-notes'"):
        node.train_round(n2, job="second", round=1, federated=False)
    ledger = PrivacyLedger(state, source="clinic-notes", max_epsilon=ceiling)
    assert [e.job for e in ledger.counted] == ["first"] and ledger.spent() <= ceiling
    # ... while a small job on the changed source is charged to the same ledger (and the change is audited)
    small = node.prepare(cfg2.replace(**{"privacy.target-epsilon": 0.2}), _policy(ceiling), state_dir=state,
                         model=fresh_easy)
    node.train_round(small, job="small", round=1, federated=False)
    ledger.refresh()
    assert [e.job for e in ledger.counted] == ["first", "small"] and ledger.spent() <= ceiling
    if variation == "append-a-record":
        assert ledger.counted[0].fingerprint != ledger.counted[1].fingerprint


def test_a_causal_lm_job_on_the_same_source_spends_the_same_budget(tmp_path, fresh_easy, tiny_gpt2_dir):
    csv = write_easy_csv(tmp_path / "notes.csv")
    state = tmp_path / "state"
    n = node.prepare(_cfg(csv, **{"privacy.target-epsilon": 3.9}), _policy(4.0), state_dir=state, model=fresh_easy)
    node.train_round(n, job="cls", round=1, federated=False)
    lm_cfg = _cfg(csv, **{"model.task": "causal-lm", "model.path": str(tiny_gpt2_dir), "data.labels": "",
                          "privacy.target-epsilon": 3.9})
    lm = node.prepare(lm_cfg, _policy(4.0), state_dir=state)
    with pytest.raises(BudgetExceededError):
        node.train_round(lm, job="lm", round=1, federated=False)
    assert PrivacyLedger(state, source="clinic-notes", max_epsilon=4).spent() <= 4.0


def test_poisson_sampling_off_is_refused():
    with pytest.raises(ConfigError, match="poisson-sampling=false is not supported"):
        load_config({"privacy.poisson-sampling": False})


def test_delta_above_one_over_n_is_refused_before_training(tmp_path, easy_csv, fresh_easy):
    # 96 records: delta must be at most 1/96
    n = node.prepare(_cfg(easy_csv), _policy(10, delta=1e-3), state_dir=tmp_path, model=fresh_easy)
    before = adapter.pack(fresh_easy.model, ffa=False)
    node.train_round(n, job="ok", round=1, federated=False)  # 1e-3 <= 1/96: fine
    big = write_easy_csv(tmp_path / "big.csv", n=1500)  # the source grows past 1/delta = 1000 records
    n2 = node.prepare(_cfg(big), _policy(10, delta=1e-3), state_dir=tmp_path, model=fresh_easy)
    trained = adapter.pack(fresh_easy.model, ffa=False)
    with pytest.raises(PrivacyError, match="delta 0.001 is too large .* 1,500 records") as err:
        node.train_round(n2, job="grown", round=1, federated=False)
    assert "set delta=1e-05" in str(err.value)
    assert adapter.pack(fresh_easy.model, ffa=False)["base_model.model.classifier.weight"].tolist() == \
        trained["base_model.model.classifier.weight"].tolist()
    assert any((trained[k] != before[k]).any() for k in before)
    assert [e.job for e in PrivacyLedger(tmp_path, source="clinic-notes", max_epsilon=10).counted] == ["ok"]


def test_dp_off_is_refused_under_a_finite_ceiling(tmp_path, easy_csv, fresh_easy):
    n = node.prepare(_cfg(easy_csv, **{"privacy.enabled": False}), _policy(100), state_dir=tmp_path, model=fresh_easy)
    with pytest.raises(BudgetExceededError, match="would bring it to inf"):
        node.train_round(n, job="j", round=1, federated=False)


@pytest.mark.parametrize("where,kept", [("adapter.pack", ("settled", 2)), ("node.train_steps", ("cancelled", 2))])
def test_a_failure_after_the_release_keeps_the_spend_one_before_returns_it(tmp_path, easy_csv, fresh_easy,
                                                                             monkeypatch, where, kept):
    """Packing the weights fails after the ledger entry is settled: spent. Training fails before anything
    derived from the data left the node: the reservation is returned."""
    n = node.prepare(_cfg(easy_csv), _policy(10), state_dir=tmp_path, model=fresh_easy)

    def fail(*a, **k):
        raise RuntimeError("power cut")

    module, name = where.split(".")
    monkeypatch.setattr({"adapter": adapter, "node": node}[module], name, fail)
    with pytest.raises(RuntimeError, match="power cut"):
        node.train_round(n, job="j", round=1, federated=False)
    ledger = PrivacyLedger(tmp_path, source="clinic-notes", max_epsilon=10)
    assert [(e.status, e.steps) for e in ledger.entries] == [kept]
    assert (ledger.spent() > 0) == (kept[0] == "settled")


CRASH_CHILD = r"""
import os, sys
from helpers import EASY_LABELS, small_config
from fedtune.common.training import node
from fedtune.common.training import train
cfg = small_config(**{"data.path": sys.argv[1], "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                      "train.local-steps": 2})
n = node.prepare(cfg, node.NodePolicy(source="clinic-notes", max_epsilon=10), state_dir=sys.argv[2])
def killed(*a, **k):
    os._exit(9)  # the process dies mid-training: no exception handler, no cleanup runs
train.train_steps = killed
node.train_steps = killed
node.train_round(n, job="j", round=1, federated=False)
"""


def test_a_process_killed_mid_training_leaves_its_reservation_counted(tmp_path, easy_csv):
    state = tmp_path / "state"
    proc = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(easy_csv), str(state)], cwd=ROOT / "tests",
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    ledger = PrivacyLedger(state, source="clinic-notes", max_epsilon=10)
    assert [(e.status, e.steps) for e in ledger.entries] == [("reserved", 2)]
    assert ledger.spent() > 0  # counted, although the round never finished


CONCURRENT_CHILD = r"""
import json, sys, time
from pathlib import Path
from helpers import EASY_LABELS, small_config
from fedtune.common.training import node
from fedtune.common.errors import BudgetExceededError
csv, state, job, sync = sys.argv[1:5]
cfg = small_config(**{"data.path": csv, "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                      "train.local-steps": 2, "privacy.target-epsilon": 3.5})
n = node.prepare(cfg, node.NodePolicy(source="clinic-notes", max_epsilon=4.0), state_dir=state)
node.job_plan(n, job, federated=False)  # both plan against the same, still empty, ledger
Path(sync, job + ".ready").touch()
while not Path(sync, "go").exists():
    time.sleep(0.01)
try:
    r = node.train_round(n, job=job, round=1, federated=False)
    out = {"ok": True, "epsilon": r.epsilon_spent}
except BudgetExceededError as e:
    out = {"ok": False, "error": str(e)}
Path(sync, job + ".json").write_text(json.dumps(out))
"""


@pytest.mark.slow
def test_two_concurrent_trainings_cannot_pass_the_ceiling_together(tmp_path, easy_csv):
    # Prepare: two processes of one node, each with a job of epsilon 3.5, on a source whose ceiling is 4
    state, sync = tmp_path / "state", tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_CHILD, str(easy_csv), str(state), job, str(sync)],
                              cwd=ROOT / "tests", env=env, stderr=subprocess.PIPE, text=True) for job in ("a", "b")]
    deadline = time.monotonic() + 300
    while not all((sync / f"{j}.ready").exists() for j in ("a", "b")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.1)
    # Execute: both start training at the same moment
    (sync / "go").touch()
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    results = [json.loads((sync / f"{j}.json").read_text()) for j in ("a", "b")]
    # Assert: exactly one trained; the other was refused before training; the ceiling holds
    assert sorted(r["ok"] for r in results) == [False, True], results
    ledger = PrivacyLedger(state, source="clinic-notes", max_epsilon=4.0)
    assert len(ledger.counted) == 1 and ledger.spent() <= 4.0


def test_legacy_ledgers_are_imported_into_the_first_source_ledger(tmp_path):
    legacy = tmp_path / "ledger" / ("ab" * 16 + ".json")
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"format": 1, "dataset_id": "ab" * 32, "n_records": 500, "delta": 1e-5,
                                  "accountant": "rdp", "created": 0, "entries": [
                                      {"job": "old", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.05,
                                       "steps": 100, "time": 1.0, "epsilon_after": 2.0}]}))
    assert legacy_files(tmp_path) == [legacy]
    lg = PrivacyLedger(tmp_path, source="clinic-notes", max_epsilon=10)
    entry = lg.reserve(job="new", round=1, kind="train", noise_multiplier=1.0, sample_rate=0.05, steps=100,
                       fingerprint="x", n_records=500)
    assert [e.job for e in lg.counted] == ["old", "new"]
    assert entry.epsilon_after == pytest.approx(privacy.epsilon([(1.0, 0.05, 200)], delta=1e-5, kind="pld"))
    assert legacy_files(tmp_path) == [] and legacy.with_name(legacy.name + ".migrated").exists()
    assert [x.source for x in open_all(tmp_path)] == ["clinic-notes"]


def test_unreadable_ledger_is_a_clear_error(tmp_path):
    lg = PrivacyLedger(tmp_path, source="s", max_epsilon=5)
    lg.reserve(job="j", round=1, kind="train", noise_multiplier=1.0, sample_rate=0.1, steps=10, fingerprint="f",
               n_records=100)
    lg.path.write_text(lg.path.read_text()[:40])
    with pytest.raises(LedgerError, match="never delete a ledger"):
        PrivacyLedger(tmp_path, source="s", max_epsilon=5)


def test_ledger_file_is_complete_json_after_each_release(tmp_path):
    lg = PrivacyLedger(tmp_path, source="s", max_epsilon=50)
    for r in range(3):
        e = lg.reserve(job="j", round=r, kind="train", noise_multiplier=1.1, sample_rate=0.05, steps=20,
                       fingerprint="f", n_records=1000)
        lg.settle(e)
        on_disk = json.loads(lg.path.read_text())
        assert len(on_disk["entries"]) == r + 1 and on_disk["entries"][-1]["status"] == "settled"
    assert on_disk["delta"] == pytest.approx(1e-5) and on_disk["source"] == "s"
    assert not list(lg.path.parent.glob(".*.tmp*"))


def test_disk_cache_gives_the_same_node(tmp_path, easy_csv, fresh_easy):
    """A fresh process per message reuses tokenized data from the node's disk, and the job's noise from its ledger."""
    cfg = _cfg(easy_csv)
    cache = tmp_path / "cache"
    a = node.prepare(cfg, _policy(10), state_dir=tmp_path, model=fresh_easy, cache_dir=cache)
    assert len(list(cache.glob("tokens-*.safetensors"))) == 1
    b = node.prepare(cfg, _policy(10), state_dir=tmp_path, model=fresh_easy, cache_dir=cache)
    for x, y in zip((a.train_set, a.val_set, a.test_set), (b.train_set, b.val_set, b.test_set), strict=True):
        assert all((s == t).all() for s, t in zip(x.tensors, y.tensors, strict=True))
    assert node.job_plan(a, "j") == node.job_plan(b, "j")  # planned once, kept in the ledger
    # a lower ceiling on the node calibrates a new job with more noise
    c = node.prepare(cfg, _policy(2), state_dir=tmp_path / "other", model=fresh_easy, cache_dir=cache)
    assert node.job_plan(c, "j").noise_multiplier > node.job_plan(a, "j").noise_multiplier
