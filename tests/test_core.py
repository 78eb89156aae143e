"""Config, data formats, splits, the adapter wire format and the layering rule."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.common.errors import AdapterError, ConfigError
from fedtune.common.privacy import accounting as privacy
from fedtune.common.training import adapter, data
from fedtune.common.training.assets import BBC_LABELS
from fedtune.common.training.config import JobConfig, all_keys, load_config
from helpers import EASY_LABELS, write_easy_csv

ROOT = Path(__file__).resolve().parents[1]


# -- config --------------------------------------------------------------------
def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert cfg == JobConfig()
    assert load_config(cfg.to_flat()) == cfg
    assert set(cfg.to_flat()) == set(all_keys())


def test_strings_and_flower_values_are_parsed():
    cfg = load_config({"lora.r": "16", "privacy.enabled": "false", "train.lr": 1, "lora.ffa": True,
                       "train.local_epochs": "2.5"})
    assert (cfg.lora.r, cfg.privacy.enabled, cfg.train.lr, cfg.lora.ffa, cfg.train.local_epochs) == (
        16, False, 1.0, True, 2.5)


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config({"nope": 1, "lora.r": 0, "privacy.accountant": "magic", "train.batch-size": "x"})
    assert len(e.value.problems) == 4
    text = str(e.value)
    for key in ("nope", "lora.r", "privacy.accountant", "train.batch-size"):
        assert key in text


# -- data ----------------------------------------------------------------------
def test_csv_jsonl_parquet_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = write_easy_csv(tmp_path / "d.csv", n=30)
    recs = data.read_records(csv_path, text_column="text", label_column="label", labels=EASY_LABELS)
    jsonl = tmp_path / "d.jsonl"
    import json

    jsonl.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(recs.texts, recs.labels)))
    pq.write_table(pa.table({"text": recs.texts, "label": recs.labels}), tmp_path / "d.parquet")
    for p in (jsonl, tmp_path / "d.parquet"):
        other = data.read_records(p, text_column="text", label_column="label", labels=EASY_LABELS)
        assert other.texts == recs.texts and other.labels == recs.labels
        assert other.fingerprint() == recs.fingerprint()


def test_bbc_news_split_is_fixed_and_disjoint():
    a = data.load_splits(path="", text_column="text", label_column="label", labels=[], task="seq-cls",
                         val_fraction=0.1, test_fraction=0.2, seed=0)
    b = data.load_splits(path="", text_column="text", label_column="label", labels=[], task="seq-cls",
                         val_fraction=0.1, test_fraction=0.2, seed=0)
    assert a.labels == list(BBC_LABELS)
    assert a.test.texts == b.test.texts and a.fingerprint == b.fingerprint
    n = len(a.train) + len(a.val) + len(a.test)
    assert 2100 < n < 2225  # 2,225 articles less exact duplicates
    assert not set(a.train.texts) & set(a.test.texts)
    assert not set(a.val.texts) & set(a.test.texts)
    assert set(a.train.labels) == set(BBC_LABELS)


def test_max_records_keeps_the_source_fingerprint_and_size():
    full = data.load_splits(path="", text_column="text", label_column="label", labels=[], task="seq-cls",
                            val_fraction=0.1, test_fraction=0.2, seed=0)
    small = data.load_splits(path="", text_column="text", label_column="label", labels=[], task="seq-cls",
                             val_fraction=0.1, test_fraction=0.2, seed=0, max_records=50)
    assert len(small.train) + len(small.val) + len(small.test) == 50
    # the audit fingerprint and the size delta is checked against describe the whole source
    assert small.fingerprint == full.fingerprint and small.n_source == full.n_source == 2225


# -- adapter wire format -------------------------------------------------------
def test_pack_unpack_round_trip_and_opacus_wrapping(minilm_easy, easy_csv):
    lm = copy.deepcopy(minilm_easy)
    arrays = adapter.pack(lm.model, ffa=False)
    assert all(v.dtype == np.float32 for v in arrays.values())
    assert any(k.endswith("classifier.weight") for k in arrays)  # the head is part of the adapter
    changed = {k: v + 0.25 for k, v in arrays.items()}
    adapter.unpack(lm.model, changed, ffa=False)
    back = adapter.pack(lm.model, ffa=False)
    for k in arrays:
        np.testing.assert_array_equal(back[k], changed[k])
    # wrapped by Opacus: same keys, same values (the "_module." prefix never leaks)
    lm.model.train()
    opt = torch.optim.SGD([p for p in lm.model.parameters() if p.requires_grad], lr=0.1)
    ds = data.tokenize(data.read_records(easy_csv, text_column="text", label_column="label", labels=EASY_LABELS),
                       lm.tokenizer, label_set=EASY_LABELS, max_length=16)
    dp_model, _, _, _ = privacy.make_private(model=lm.model, optimizer=opt,
                                             loader=torch.utils.data.DataLoader(ds, batch_size=8),
                                             noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks")
    wrapped = adapter.pack(dp_model, ffa=False)
    assert list(wrapped) == list(back)
    adapter.unpack(dp_model, arrays, ffa=False)
    privacy.release(dp_model)
    np.testing.assert_array_equal(adapter.pack(lm.model, ffa=False)[next(iter(arrays))], arrays[next(iter(arrays))])


def test_ffa_exchanges_only_b_and_head(minilm_easy):
    full = adapter.pack(minilm_easy.model, ffa=False)
    ffa = adapter.pack(minilm_easy.model, ffa=True)
    assert set(ffa) == {k for k in full if "lora_A" not in k}
    assert any("lora_B" in k for k in ffa) and any("classifier" in k for k in ffa)


def test_same_seed_gives_identical_initial_adapters(minilm_easy):
    """FFA-LoRA relies on every node building the same frozen A from the shared seed."""
    from fedtune.common.training.model import build_lora_model

    again = build_lora_model(model_path="", task="seq-cls", labels=EASY_LABELS, r=8, alpha=16, dropout=0.0,
                             target_modules=None, ffa=True, seed=0)
    other = build_lora_model(model_path="", task="seq-cls", labels=EASY_LABELS, r=8, alpha=16, dropout=0.0,
                             target_modules=None, ffa=True, seed=1)
    a, b, c = (adapter.adapter_state(m.model) for m in (minilm_easy, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.pop(next(iter(a))), "missing"),
    (lambda a: a.__setitem__("base_model.model.extra.weight", np.zeros(3, np.float32)), "unexpected"),
    (lambda a: a.__setitem__(next(iter(a)), np.zeros((2, 2), np.float32)), "shape"),
    (lambda a: a[next(iter(a))].__setitem__((0, 0), np.nan), "NaN"),
])
def test_unpack_refuses_arrays_that_do_not_fit(minilm_easy, mutate, match):
    lm = copy.deepcopy(minilm_easy)
    arrays = adapter.pack(lm.model, ffa=False)
    mutate(arrays)
    with pytest.raises(AdapterError, match=match):
        adapter.unpack(lm.model, arrays, ffa=False)


# -- layering ------------------------------------------------------------------
def _imports(folder: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import statement under ``folder``, lazy ones included."""
    out = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            out += [(str(path.relative_to(ROOT)), n) for n in names]
    return out


def test_common_never_imports_flower():
    assert not [(f, n) for f, n in _imports("common") if n.split(".")[0] == "flwr"]
    code = ("import sys, pkgutil, importlib, fedtune.common as c\n"
            "for m in pkgutil.walk_packages(c.__path__, 'fedtune.common.'): importlib.import_module(m.name)\n"
            "assert len([m for m in sys.modules if m.startswith('fedtune.common.')]) > 10\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'flwr'], 'flwr imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_layers_point_one_way():
    """Simulation is a caller: nothing in client/ or server/ imports simulations/; common/ imports neither."""
    assert not [(f, n) for d in ("client", "server") for f, n in _imports(d) if n.startswith("fedtune.simulations")]
    assert not [(f, n) for f, n in _imports("common")
                if n.startswith(("fedtune.envelope", "fedtune.client", "fedtune.server", "fedtune.simulations",
                                 "fedtune.cli"))]
    # the envelope both edges speak depends on neither edge
    assert not [(f, n) for f, n in _imports("envelope")
                if n.startswith(("fedtune.client", "fedtune.server", "fedtune.simulations", "fedtune.cli"))]
    assert sorted(p.name for p in (ROOT / "common").iterdir() if (p / "__init__.py").is_file()) == [
        "operations", "privacy", "secagg", "serving", "training"]


def test_common_sub_packages_import_downward():
    """The secure-aggregation protocol needs nothing of training, privacy accounting needs neither, and the job
    configuration reads the secure-aggregation limits from their leaf module, not from the protocol."""
    assert not [(f, n) for f, n in _imports("common/secagg") if n.startswith("fedtune.common.training")]
    assert not [(f, n) for f, n in _imports("common/privacy")
                if n.startswith(("fedtune.common.training", "fedtune.common.secagg"))]
    config = [n for f, n in _imports("common/training") if f == "common/training/config.py"]
    assert "fedtune.common.secagg.limits" in config  # (the check below would pass vacuously on a renamed module)
    assert not [n for n in config if n.startswith("fedtune.common.secagg") and n != "fedtune.common.secagg.limits"]
    limits = [n for f, n in _imports("common/secagg") if f == "common/secagg/limits.py"]
    assert set(limits) <= {"__future__", "fedtune.common.errors"}  # a leaf: no cryptography, no training
    # the order of common/'s sub-packages: each imports only those before it (run views and the run directory
    # need no torch; accounting needs no model; the protocol needs no training; serving sits on top)
    order = ["operations", "privacy", "secagg", "training", "serving"]
    upward = [(f, n) for i, pkg in enumerate(order) for f, n in _imports(f"common/{pkg}")
              if n.startswith("fedtune.common.") and n.split(".")[2] in order[i + 1:]]
    assert not upward, upward


def test_message_types_and_record_names_are_spelled_only_in_the_envelope():
    """One envelope (fedtune.envelope) builds and opens every message for both sides: the edges spell no message
    type and no record name (they were literals in six files, "secagg_keys" on one side and
    "query.secagg_keys" on the other)."""
    import re

    spelled = re.compile(r'message_type="|@app\.query\("|(config|array|metric)_records(\.get\(|\[)"|'
                         r'content\[\s*"|RecordDict\(\{')
    found = [(str(p.relative_to(ROOT)), i + 1, line.strip())
             for d in ("client", "server") for p in sorted((ROOT / d).rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if spelled.search(line)]
    assert not found, found
    from fedtune import envelope

    assert {envelope.query_action(t) for t in envelope.SECAGG_QUERIES} == {
        "secagg_keys", "secagg_join", "secagg_consistency", "secagg_unmask"}


def test_importing_the_model_module_changes_no_environment():
    """Importing fedtune.common.training.model used to set HF_HUB_OFFLINE as a side effect; the command line sets
    it where a process starts, and every from_pretrained passes local_files_only=True."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    code = ("import os, fedtune.common.training.model, fedtune.common.training.builder; "
            "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "None"]
    calls = []
    for d in ("common", "server", "client", "simulations"):
        for p in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "from_pretrained" \
                        and not any(k.arg == "local_files_only" and getattr(k.value, "value", None) is True
                                    for k in node.keywords):
                    calls.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not calls, f"from_pretrained without local_files_only=True: {calls}"


def test_a_masked_reply_cannot_carry_the_update_or_the_weight_in_the_clear():
    """The envelope itself refuses to build a secure reply that also holds the clear update or the weight (before,
    only the caller's choice of ``to_record(secure=True)`` kept them out)."""
    import numpy as np
    import pytest
    from fedtune import envelope
    from fedtune.common.training.wire import NodeInfo, NodeRoundResult

    result = NodeRoundResult(update={"w": np.ones(2, np.float32)}, weight=3, epsilon=1.0)
    masked = np.zeros(4, np.uint32)
    for leaky in (result.to_record(), {"metrics": {"weight": 3}}):
        with pytest.raises(ValueError, match="in the clear"):
            envelope.reply(NodeInfo("a"), result=leaky, masked=masked)
    content = envelope.reply(NodeInfo("a"), result=result.to_record(secure=True), masked=masked)
    assert set(content.array_records) == {envelope.MASKED} and "weight" not in envelope.reply_metrics(content)
