"""Features once (head-only recipes): the same DP mechanism, computed on the frozen encoder's features."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from fedtune.common.privacy import accounting
from fedtune.common.training import adapter, data, features, node
from fedtune.common.training.model import build_lora_model
from helpers import EASY_LABELS, small_config, write_easy_csv


@pytest.fixture(scope="module")
def head_only_mean():
    return build_lora_model(model_path="", task="seq-cls", labels=EASY_LABELS, r=8, alpha=16, dropout=0.0,
                            target_modules=None, ffa=False, seed=0, head_only=True, pooling="mean")


def _seeded(monkeypatch):
    """Poisson sampling and noise from a fixed seed sequence instead of the OS (only so two runs can be compared)."""
    seeds = itertools.count(1234)

    def fresh():
        g = torch.Generator()
        g.manual_seed(next(seeds))
        return g

    monkeypatch.setattr(accounting, "fresh_generator", fresh)


@pytest.mark.parametrize("noise", [0.0, 1.1])
def test_cached_and_uncached_training_give_the_same_head(tmp_path, monkeypatch, head_only_mean, noise):
    csv = write_easy_csv(tmp_path / "d.csv", n=80)
    base = {"data.path": str(csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0, "lora.head-only": True,
            "model.pooling": "mean", "train.optimizer": "sgd", "train.lr": 5.0, "train.local-steps": 6,
            "train.batch-size": 16, "privacy.noise-multiplier": noise if noise else 0.0,
            "privacy.enabled": bool(noise), "train.rounds": 2}
    heads, nets = [], []
    for cache in (True, False):
        _seeded(monkeypatch)
        lm = copy.deepcopy(head_only_mean)
        cfg = small_config(**base, **{"train.cache-features": cache})
        n = node.prepare(cfg, node.NodePolicy(source="s", max_epsilon=50.0 if noise else math.inf),
                         state_dir=tmp_path / f"s-{cache}", model=lm)
        nets.append(type(n.net).__name__)
        start = adapter.pack(lm.model, ffa=False, head_only=True)
        for rnd in (1, 2):
            r = node.train_round(n, job="j", round=rnd, federated=False)
        assert r.stats.steps == 6 and r.noise_multiplier == noise
        heads.append(r.arrays)
        ev = node.evaluate_split(n, "test")
        heads[-1] = (r.arrays, ev["accuracy"], ev["loss"])
    assert nets == ["FeatureHead", "PeftModelForSequenceClassification"]
    (a, acc_a, loss_a), (b, acc_b, loss_b) = heads
    for k in a:
        assert np.abs(a[k] - start[k]).max() > 1e-3  # the head really trained
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert acc_a == acc_b and loss_a == pytest.approx(loss_b, rel=1e-4)


def test_features_are_computed_once_and_only_for_a_frozen_encoder(tmp_path, head_only_mean, minilm_easy):
    csv = write_easy_csv(tmp_path / "d.csv", n=60)
    cfg = small_config(**{"data.path": str(csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "lora.head-only": True, "model.pooling": "mean"})
    a = node.prepare(cfg, node.NodePolicy(source="s", max_epsilon=20), state_dir=tmp_path / "a", model=head_only_mean)
    calls = []
    hook = features.head_wrapper(head_only_mean.model).register_forward_hook(lambda *_: calls.append(1))
    try:  # the same records again, and a subset of them (a baseline, a partition): no encoder pass at all
        b = node.prepare(cfg, node.NodePolicy(source="s", max_epsilon=20), state_dir=tmp_path / "b",
                         model=head_only_mean)
        tokens = data.tokenize(b.splits.train.subset(range(0, len(b.splits.train), 2)), head_only_mean.tokenizer,
                               label_set=EASY_LABELS, max_length=cfg.model.max_length)
        half = features.extract(head_only_mean.model, tokens, base_path=head_only_mean.base_path, batch_size=32)
    finally:
        hook.remove()
    assert calls == []
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert torch.equal(half.tensors[0], a.train_set.tensors[0][::2])
    assert a.train_set.tensors[0].dtype == torch.float32 and a.train_set.tensors[0].shape[1] == 384
    # the features are the normalised mean of the encoder's states: unit length
    assert torch.allclose(a.train_set.tensors[0].norm(dim=1), torch.ones(len(a.train_set)), atol=1e-4)
    lora = node.prepare(small_config(**{"data.path": str(csv), "data.labels": ",".join(EASY_LABELS),
                                        "data.max-records": 0}), node.NodePolicy(source="s", max_epsilon=20),
                        state_dir=tmp_path / "c", model=minilm_easy)
    assert lora.net is minilm_easy.model and lora.train_set.tensors[0].dtype == torch.long  # LoRA: tokens
    assert features.head_wrapper(minilm_easy.model) is None


def test_a_copy_of_a_mean_pooled_model_pools_over_its_own_mask(head_only_mean):
    """Found by the features test: the mean pooler's hooks captured the original pooler in a closure, so a
    copy.deepcopy of the model set the original's mask and pooled over padding (other logits, silently)."""
    copied = copy.deepcopy(head_only_mean)
    batch = head_only_mean.tokenizer(["a goal", "shares fell sharply after the bank reported lower profits"],
                                     padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(copied.model(**batch).logits, head_only_mean.model(**batch).logits)
