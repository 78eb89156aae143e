"""Attack: crafted weights turn DP-SGD into a membership oracle.

The server computes one target text's features from the public base model and sends a finite classification
head aligned with them (entries near 1e38). Only the target's logit overflows, so its loss and per-sample
gradient become NaN; Opacus' clipping would carry the NaN into every coordinate of the summed gradient, and
the node's whole update would be NaN exactly when the target was sampled. The node must release nothing
non-finite whatever it is sent, or refuse the message the same way whether or not the target is there.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from fedtune.client.app import make_client_app
from fedtune.common.privacy.ledger import PrivacyLedger
from fedtune.common.training import adapter, data
from fedtune.common.training.evaluate import private_counts
from fedtune.common.training.model import build_lora_model
from helpers import EASY_LABELS, small_settings, write_easy_csv
from scripted_server import ScriptedServer

HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _target() -> str:
    """A record the attacker wants to detect, one that lands in the training split (seed 0)."""
    for i in range(100):
        text = f"the ambassador of atlantis resigned over the submarine affair, case {i}"
        if data.record_unit(text, purpose="split", seed=0) >= 0.3:
            return text
    raise AssertionError("no candidate lands in train")


def _sources(tmp_path) -> dict[str, object]:
    """Two sources of 60 records that differ in one record: the target, or another finance record."""
    base = write_easy_csv(tmp_path / "base.csv", n=59).read_text(encoding="utf-8")
    out = {}
    for name, extra in (("with", _target()), ("without", "the pension fund sold its bank shares, case 7")):
        path = tmp_path / f"{name}.csv"
        path.write_text(base + f'"{extra}",finance\n', encoding="utf-8")
        out[name] = path
    return out


JOB = small_settings(**{"data.labels": ",".join(EASY_LABELS), "data.max-records": 0, "lora.head-only": True,
                        "model.pooling": "mean", "train.optimizer": "sgd", "train.lr": 1.0,
                        # 60 records, 70% planned in train = 42: a batch of 42 samples every record every step
                        "train.batch-size": 42, "train.local-steps": 2, "train.rounds": 2,
                        "privacy.target-epsilon": 8.0, "fed.secure-aggregation": False})


def _crafted_head() -> dict[str, np.ndarray]:
    """The attacker's head: the target's mean-pooled features from the public base model, scaled to overflow."""
    lm = build_lora_model(model_path="", task="seq-cls", labels=EASY_LABELS, r=8, alpha=16, dropout=0.0,
                          target_modules=None, ffa=False, seed=0, head_only=True, pooling="mean")
    enc = lm.tokenizer([_target()], truncation=True, max_length=24, padding="max_length", return_tensors="pt")
    bert = lm.model.base_model.model.bert
    with torch.no_grad():
        h = bert(**enc).pooler_output[0].float()  # the normalised mean of the last hidden states
    arrays = adapter.pack(lm.model, ffa=False, head_only=True)
    w = np.zeros_like(arrays[HEAD_W])
    scale = 0.75 * FLOAT32_MAX / float(h.abs().max())
    w[EASY_LABELS.index("finance")] = (scale * h.double().numpy()).astype(np.float32)  # entries up to ~2.5e38
    assert np.isfinite(w).all() and float((torch.from_numpy(w) @ h)[1]) == float("inf")  # the target overflows
    arrays[HEAD_W], arrays[HEAD_B] = w, np.zeros_like(arrays[HEAD_B])
    return arrays


def _node(tmp_path, csv, name: str, **node_config) -> ScriptedServer:
    nc = {"name": name, "data-path": str(csv), "source": "notes", "state-dir": str(tmp_path / f"state-{name}"),
          "max-epsilon": 20.0, "require-secure-aggregation": "off", **node_config}
    return ScriptedServer(make_client_app(), node_config=nc, run_config=JOB)


def _released(reply) -> list[float]:
    """Every number in the reply: update tensors and metrics."""
    out = []
    for rec in reply.content.array_records.values():
        for a in rec.values():
            out.extend(np.asarray(a.numpy(), dtype=np.float64).ravel().tolist())
    for rec in reply.content.metric_records.values():
        for v in rec.values():
            out.extend(np.asarray(v, dtype=np.float64).ravel().tolist())
    return out


@pytest.mark.parametrize("message", ["train", "evaluate"])
def test_a_crafted_head_is_refused_by_the_nodes_bounds_the_same_way_with_or_without_the_target(tmp_path, message):
    sources, crafted = _sources(tmp_path), _crafted_head()
    replies = {}
    for name, csv in sources.items():
        node = _node(tmp_path, csv, name)
        replies[name] = node.send(message, config={"job": "probe", "server-round": 1}, arrays=crafted)
    info = {name: dict(r.content["info"]) for name, r in replies.items()}
    assert info["with"]["status"] == info["without"]["status"] == "unsafe"
    assert info["with"]["reason"] == info["without"]["reason"] and "max-received-abs" in info["with"]["reason"]
    for name, r in replies.items():  # refused before anything was read or spent
        assert not r.content.array_records and not r.content.metric_records
        assert not (tmp_path / f"state-{name}" / "ledger").exists()


def test_with_bounds_raised_the_crafted_head_still_releases_nothing_non_finite(tmp_path, caplog):
    """An organization that raised its bounds (or a head inside them that still overflows): the per-record
    guard zeroes the target's contribution, so the update is finite with or without it, and accounted."""
    sources, crafted = _sources(tmp_path), _crafted_head()
    loose = {"max-received-abs": 1e39, "max-received-norm": 1e40}
    caplog.set_level(logging.WARNING, logger="fedtune.common.training.train")
    for name, csv in sources.items():
        node = _node(tmp_path, csv, name, **loose)
        for rnd in (1, 2):
            reply = node.send("train", config={"job": "probe", "server-round": rnd}, arrays=crafted)
            assert reply.content["info"]["status"] == "ok", reply.content["info"]["reason"]
            values = _released(reply)
            assert values and np.isfinite(values).all(), f"{name}: a non-finite value left the node"
            assert "train-loss" not in reply.content["metrics"]
        ledger = PrivacyLedger(tmp_path / f"state-{name}", source="notes", max_epsilon=20.0)
        assert [(e.kind, e.round, e.status) for e in ledger.entries] == [("train", 1, "settled"), ("train", 2, "settled")]
        ev = node.send("evaluate", config={"job": "probe", "server-round": 1}, arrays=crafted)
        assert ev.content["info"]["status"] == "ok" and np.isfinite(_released(ev)).all()
    # the node's own log says the guard acted (the target was sampled in every step: the rate is 1)
    dropped = [r for r in caplog.records if "non-finite loss or gradient" in r.getMessage()]
    assert dropped and all(r.args[0] >= 1 for r in dropped)


def test_a_causal_lm_evaluation_answer_stays_finite_when_the_model_overflows(tiny_gpt2_dir):
    """The causal-LM answer clipped each record's loss with clamp, which lets NaN through: one record whose
    loss is NaN turned the whole answer into NaN. Each record now adds at most the clip."""
    lm = build_lora_model(model_path=str(tiny_gpt2_dir), task="causal-lm", labels=[], r=4, alpha=8, dropout=0.0,
                          target_modules=None, ffa=False, seed=0)
    with torch.no_grad():  # a LoRA update far out of range: the hidden states overflow to inf/NaN
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.fill_(1e30)
    records = data.Records(["the striker scored", "the bank raised rates", "the coach praised"], [], "t")
    ds = data.tokenize(records, lm.tokenizer, label_set=[], max_length=16)
    counts = private_counts(lm.model, ds, task="causal-lm", batch_size=2)
    assert np.isfinite(counts).all() and counts[0] == 3 and 0 <= counts[1] <= 3
