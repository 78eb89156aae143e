"""DP-SGD invariants on the real MiniLM: DP wraps the loop without changing it, and really trains."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fedtune.common.privacy import accounting as privacy
from fedtune.common.training import adapter, data, node, train
from fedtune.common.training.train import make_optimizer, train_steps
from helpers import EASY_LABELS, LORA_RECIPE, small_config, write_easy_csv
from torch.utils.data import DataLoader


def _loader(lm, records, seed=0, batch_size=8):
    ds = data.tokenize(records, lm.tokenizer, label_set=EASY_LABELS, max_length=24)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _records(path):
    return data.read_records(path, text_column="text", label_column="label", labels=EASY_LABELS)


def _run(lm, records, *, dp: bool, noise: float = 0.0, clip: float = 1e9, steps: int = 3):
    """Train a copy of ``lm`` with SGD, with or without the Opacus wrapper; return its packed adapter.

    Full batches: Opacus always Poisson-samples, and at rate 1 (batch size = records) every record is
    in every batch, so the DP and non-DP runs see the same batches. The base model's dropout is
    switched off: its random masks would differ between the two runs for reasons unrelated to DP."""
    lm = copy.deepcopy(lm)
    for m in lm.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)
    loader = _loader(lm, records, batch_size=len(records))
    opt = make_optimizer(lm.model, name="sgd", lr=0.5, weight_decay=0.0)
    model = lm.model
    lm.model.train()
    if dp:
        model, opt, loader, _ = privacy.make_private(model=lm.model, optimizer=opt, loader=loader,
                                                     noise_multiplier=noise, max_grad_norm=clip,
                                                     grad_sample_mode="hooks")
    train_steps(model, loader, opt, steps=steps, task="seq-cls")
    if dp:
        privacy.release(model)
    return adapter.pack(lm.model, ffa=False)


def test_zero_noise_huge_clip_equals_non_dp_step(minilm_easy, easy_csv):
    # Prepare
    records = _records(easy_csv)
    start = adapter.pack(minilm_easy.model, ffa=False)
    # Execute
    plain = _run(minilm_easy, records, dp=False)
    dp = _run(minilm_easy, records, dp=True, noise=0.0, clip=1e9)
    # Assert: same update, to float precision, and the update is not trivially zero
    for k in start:
        step_plain, step_dp = plain[k] - start[k], dp[k] - start[k]
        assert np.abs(step_plain).max() > 0, f"{k} did not move"
        np.testing.assert_allclose(step_dp, step_plain, rtol=1e-3, atol=1e-6, err_msg=k)


def test_clipping_changes_the_step(minilm_easy, easy_csv):
    records = _records(easy_csv)
    plain = _run(minilm_easy, records, dp=False, steps=1)
    clipped = _run(minilm_easy, records, dp=True, noise=0.0, clip=1e-3, steps=1)
    start = adapter.pack(minilm_easy.model, ffa=False)
    k = "base_model.model.classifier.weight"
    # a tiny clip norm shrinks every per-sample gradient, so the step is much smaller
    assert np.abs(clipped[k] - start[k]).max() < 0.1 * np.abs(plain[k] - start[k]).max()


def test_noise_makes_runs_differ(minilm_easy, easy_csv):
    records = _records(easy_csv)
    a = _run(minilm_easy, records, dp=True, noise=1.0, clip=1.0)
    b = _run(minilm_easy, records, dp=True, noise=1.0, clip=1.0)
    assert any(not np.allclose(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ffa", [False, True])
def test_lora_and_head_really_change_under_opacus(tmp_path, easy_csv, minilm_easy, ffa):
    # Prepare: a node on the easy data, with the real model
    lm = copy.deepcopy(minilm_easy)
    if ffa:
        lm.ffa = True
        for name, p in lm.model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    cfg = small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "lora.ffa": ffa,
                          "data.max-records": 0})
    n = node.prepare(cfg, node.NodePolicy(source="easy", max_epsilon=50), state_dir=tmp_path / "state", model=lm)
    before_all = {k: v.detach().clone() for k, v in adapter.adapter_state(lm.model).items()}
    before = adapter.pack(lm.model, ffa=ffa)
    # Execute
    result = node.train_round(n, job="t", round=1, federated=False)
    after_all = adapter.adapter_state(lm.model)
    # Assert: every exchanged tensor moved, and the returned arrays are the model's current weights
    assert set(result.arrays) == set(before)
    for k in before:
        assert not np.allclose(result.arrays[k], before[k]), f"{k} unchanged after DP training"
        np.testing.assert_array_equal(result.arrays[k], after_all[k].numpy())
    lora_a = [k for k in before_all if "lora_A" in k]
    assert lora_a
    if ffa:  # A frozen and not exchanged
        assert not any("lora_A" in k for k in result.arrays)
        assert all(torch.equal(before_all[k], after_all[k]) for k in lora_a)
    else:
        assert any("lora_A" in k for k in result.arrays)


def test_head_only_trains_and_exchanges_only_the_head_under_opacus(tmp_path, easy_csv, minilm_easy):
    # Prepare: the same model as head-only training builds it (every LoRA tensor frozen)
    lm = copy.deepcopy(minilm_easy)
    lm.head_only = True
    for name, p in lm.model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    cfg = small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "lora.head-only": True,
                          "data.max-records": 0})
    n = node.prepare(cfg, node.NodePolicy(source="easy", max_epsilon=50), state_dir=tmp_path / "state", model=lm)
    before_all = {k: v.detach().clone() for k, v in adapter.adapter_state(lm.model).items()}
    # Execute
    result = node.train_round(n, job="t", round=1, federated=False)
    after_all = adapter.adapter_state(lm.model)
    # Assert: only the head leaves the node, it moved, and no LoRA tensor changed (B stays 0: a pure linear probe)
    assert result.arrays and all("lora_" not in k for k in result.arrays)
    assert any("classifier" in k for k in result.arrays)
    for k in result.arrays:
        assert not np.allclose(result.arrays[k], before_all[k].numpy()), f"{k} unchanged after DP training"
    lora = [k for k in before_all if "lora_" in k]
    assert lora and all(torch.equal(before_all[k], after_all[k]) for k in lora)
    assert all(not after_all[k].any() for k in lora if "lora_B" in k)
    assert lm.trainable_parameters() == sum(v.size for v in result.arrays.values())


def test_head_only_training_sees_the_frozen_models_features_without_dropout(minilm_easy):
    # Prepare: the model as head-only training has it (LoRA frozen), 16 easy records, the clean (eval-mode) loss
    lm = copy.deepcopy(minilm_easy)
    for name, p in lm.model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    ds = data.tokenize(data.Records(["a goal in the match"] * 8 + ["shares fell sharply"] * 8, [EASY_LABELS[0]] * 8 +
                                    [EASY_LABELS[1]] * 8, "t"), lm.tokenizer, label_set=EASY_LABELS, max_length=16)
    batch = list(ds.tensors)
    lm.model.eval()
    with torch.no_grad():
        clean = float(train.batch_loss(lm.model, batch, task="seq-cls"))
    opt = make_optimizer(lm.model, name="sgd", lr=1e-12, weight_decay=0.0)
    # Execute: one step with dropout off, one with it on (BERT's dropout 0.1 is active in train mode)
    off = train_steps(lm.model, DataLoader(ds, batch_size=16), opt, steps=1, task="seq-cls", no_dropout=True)
    on = train_steps(lm.model, DataLoader(ds, batch_size=16), opt, steps=1, task="seq-cls")
    # Assert: without dropout the training loss is the clean loss; with it, it is not
    assert off.mean_loss == pytest.approx(clean, rel=1e-6)
    assert on.mean_loss != pytest.approx(clean, rel=1e-6)


def test_physical_batches_give_the_same_logical_step_and_accounting(minilm_easy):
    """train.max-physical-batch-size: a logical Poisson batch in chunks of 4 is the same DP step as in one piece.

    Deterministic comparison: sample rate 1 (every record in every batch), zero noise, a clip that never bites,
    and a head-only model (no dropout, no randomness left)."""
    ds = data.tokenize(data.Records(["a goal in the match"] * 8 + ["shares fell sharply"] * 8, [EASY_LABELS[0]] * 8 +
                                    [EASY_LABELS[1]] * 8, "t"), minilm_easy.tokenizer, label_set=EASY_LABELS,
                       max_length=16)

    def run(max_physical: int):
        lm = copy.deepcopy(minilm_easy)
        for name, p in lm.model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
        opt = make_optimizer(lm.model, name="sgd", lr=0.5, weight_decay=0.0)
        lm.model.train()
        model, dp_opt, loader, engine = privacy.make_private(model=lm.model, optimizer=opt,
                                                             loader=DataLoader(ds, batch_size=16), noise_multiplier=0.0,
                                                             max_grad_norm=1e9, grad_sample_mode="hooks")
        stats = train_steps(model, loader, dp_opt, steps=2, task="seq-cls", no_dropout=True,
                            max_physical_batch=max_physical)
        history = list(engine.accountant.history)
        privacy.release(model)
        return adapter.pack(lm.model, ffa=False, head_only=True), stats, history

    whole, s1, h1 = run(0)
    chunked, s4, h4 = run(4)
    assert s1.steps == s4.steps == 2 and s1.examples == s4.examples == 32
    assert h1 == h4 and sum(steps for _, _, steps in h4) == 2  # the accountant saw 2 steps at rate 1 either way
    start = adapter.pack(minilm_easy.model, ffa=False, head_only=True)
    for k in whole:
        assert np.abs(whole[k] - start[k]).max() > 0
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_head_only_is_built_from_the_config_and_refused_for_causal_lm():
    from fedtune.common.errors import ConfigError
    from fedtune.common.training import builder
    from fedtune.common.training.config import load_config

    cfg = load_config({**LORA_RECIPE, "lora.head-only": "true"})
    assert "head only" in cfg.lora.describe()
    lm = builder.build_model(cfg, EASY_LABELS)
    trained = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert lm.head_only and trained and all("classifier" in n for n in trained)
    assert set(adapter.pack(lm.model, ffa=False, head_only=True)) == {
        k for k in adapter.adapter_state(lm.model) if "lora_" not in k}
    with pytest.raises(ConfigError, match="lora.head-only"):
        load_config({"lora.head-only": "true", "model.task": "causal-lm"})
    # secure aggregation's clip follows what is trained unless the job sets it: a head alone moves more than LoRA
    assert load_config(LORA_RECIPE).secagg_clip == 1.0 and cfg.secagg_clip == 10.0
    assert load_config({"lora.head-only": "true", "fed.secagg-clip": 3}).secagg_clip == 3.0
    with pytest.raises(ConfigError, match="fed.secagg-clip"):
        load_config({"fed.secagg-clip": 5000})
    from fedtune.server.app import make_aggregator

    assert make_aggregator(cfg).clip == 10.0


def test_few_dp_steps_beat_chance_and_reload_in_stock_peft(tmp_path, fresh_easy):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    # Prepare: 480 easy records, batch 32, 40 DP-SGD steps at epsilon 8 (with 20 steps a bad draw of the
    # unseeded DP noise left the model at chance about once in ten runs; 40 reached 1.0 in 10 of 10)
    csv_path = write_easy_csv(tmp_path / "easy.csv", n=480)
    cfg = small_config(**{"data.path": str(csv_path), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "train.local-steps": 40, "train.batch-size": 32, "train.lr": 0.01,
                          "privacy.target-epsilon": 8})
    n = node.prepare(cfg, node.NodePolicy(source="easy", max_epsilon=8), state_dir=tmp_path / "state", model=fresh_easy)
    before = node.evaluate_split(n, "test")
    # Execute
    node.train_round(n, job="t", round=1, federated=False)
    after = node.evaluate_split(n, "test")
    out = adapter.save_adapter(fresh_easy.model, tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(str(fresh_easy.base_path), num_labels=2)
    stock = PeftModel.from_pretrained(base, str(out)).eval()
    batch = next(iter(DataLoader(n.test_set, batch_size=16)))
    with torch.no_grad():
        ours = fresh_easy.model(input_ids=batch[0], attention_mask=batch[1]).logits
        theirs = stock(input_ids=batch[0], attention_mask=batch[1]).logits
    # Assert
    assert n.ledger.spent() <= 8.0
    assert before["accuracy"] < 0.7 and after["accuracy"] >= 0.85, (before, after)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_mean_pooling_feeds_the_head_the_sentence_embedding_and_trains_under_opacus(tmp_path, easy_csv):
    """model.pooling=mean: the head reads the normalised mean of the real tokens' last hidden states (checked
    against the encoder by hand, padding included), and a DP round through a node moves the head."""
    from fedtune.common.errors import ConfigError, ModelError
    from fedtune.common.training import builder
    from fedtune.common.training.assets import default_model_dir
    from fedtune.common.training.config import load_config
    from transformers import AutoModel

    cfg = small_config(**{"data.path": str(easy_csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "lora.head-only": True, "model.pooling": "mean"})
    lm = builder.build_model(cfg, EASY_LABELS)
    texts = ["a goal", "shares fell sharply after the bank reported lower profits"]  # the first one is padded
    batch = lm.tokenizer(texts, padding=True, return_tensors="pt")
    encoder = AutoModel.from_pretrained(str(default_model_dir())).eval()
    head = lm.model.base_model.model.classifier
    lm.model.eval()
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = head(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        got = lm.model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # padding really was left out
    # a DP round: only the head is trained and exchanged, and it moves
    n = node.prepare(cfg, node.NodePolicy(source="easy", max_epsilon=50), state_dir=tmp_path, model=lm)
    before = adapter.pack(lm.model, ffa=False, head_only=True)
    result = node.train_round(n, job="t", round=1, federated=False)
    assert set(result.arrays) == set(before) and all("classifier" in k for k in before)
    assert all(not np.allclose(result.arrays[k], before[k]) for k in before)
    # refused where it means nothing: a causal LM (config), a model without a BERT-style pooler (build)
    with pytest.raises(ConfigError, match="model.pooling"):
        load_config({"model.pooling": "mean", "model.task": "causal-lm"})
    with pytest.raises(ConfigError, match="model.pooling"):
        load_config({"model.pooling": "max"})
    from fedtune.common.training.model import use_mean_pooling
    from transformers import GPT2Config, GPT2ForSequenceClassification

    with pytest.raises(ModelError, match="model.pooling=cls"):  # a decoder classifies from its last token
        use_mean_pooling(GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, num_labels=2)))


def test_an_empty_poisson_batch_after_a_full_one_takes_a_noise_only_step(minilm_easy):
    """Found by the property-based adversary: an empty Poisson batch right after a non-empty one crashed with
    Opacus' 'Gradients haven't been cleared' (the previous step's summed gradient was still there). With zero
    noise, the empty step now moves nothing, and the two steps equal the one full step."""
    lm = copy.deepcopy(minilm_easy)
    for name, p in lm.model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    ds = data.tokenize(data.Records(["the striker scored", "the bank raised rates"], EASY_LABELS, "t"),
                       lm.tokenizer, label_set=EASY_LABELS, max_length=16)
    full = list(ds.tensors)
    empty = [t[:0] for t in ds.tensors]
    start = adapter.pack(lm.model, ffa=False, head_only=True)
    opt = make_optimizer(lm.model, name="sgd", lr=0.5, weight_decay=0.0)
    lm.model.train()
    model, dp_opt, _, _ = privacy.make_private(model=lm.model, optimizer=opt, dataset=ds, sample_rate=1.0,
                                               expected_batch_size=2, noise_multiplier=0.0, max_grad_norm=1e9,
                                               grad_sample_mode="hooks")
    stats = train_steps(model, [full, empty], dp_opt, steps=2, task="seq-cls", no_dropout=True)
    privacy.release(model)
    after_two = adapter.pack(lm.model, ffa=False, head_only=True)
    assert stats.steps == 2 and stats.examples == 2
    one = copy.deepcopy(minilm_easy)
    for name, p in one.model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    opt = make_optimizer(one.model, name="sgd", lr=0.5, weight_decay=0.0)
    one.model.train()
    model, dp_opt, _, _ = privacy.make_private(model=one.model, optimizer=opt, dataset=ds, sample_rate=1.0,
                                               expected_batch_size=2, noise_multiplier=0.0, max_grad_norm=1e9,
                                               grad_sample_mode="hooks")
    train_steps(model, [full], dp_opt, steps=1, task="seq-cls", no_dropout=True)
    privacy.release(model)
    after_one = adapter.pack(one.model, ffa=False, head_only=True)
    for k in start:
        assert np.abs(after_one[k] - start[k]).max() > 0
        np.testing.assert_allclose(after_two[k], after_one[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dp", [True, False])
def test_a_node_whose_training_split_is_empty_takes_its_planned_steps(tmp_path, minilm_easy, dp):
    """Found by the property-based adversary: with a small source or a subsample the training split can be empty
    (which depends on the records), and Opacus' sampler refused zero records (a crash); without DP the loop never
    ended. A DP node now takes its planned noise-only steps and replies like any other; a non-DP one stops."""
    import math

    csv = write_easy_csv(tmp_path / "d.csv", n=40)
    cfg = small_config(**{"data.path": str(csv), "data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                          "train.batch-size": 4, "train.local-steps": 3, "privacy.enabled": dp})
    full = data.load_splits(path=str(csv), text_column="text", label_column="label", labels=EASY_LABELS,
                            task="seq-cls", val_fraction=0.1, test_fraction=0.2, seed=0)
    empty = data.Splits(full.train.subset([]), full.val, full.test, full.labels, full.fingerprint, full.n_source,
                        full.train_share)
    n = node.prepare(cfg, node.NodePolicy(source="s", max_epsilon=20.0 if dp else math.inf), state_dir=tmp_path / "s",
                     model=copy.deepcopy(minilm_easy), splits=empty)
    start = adapter.pack(n.lora.model, ffa=False)
    r = node.train_round(n, job="j", round=1, federated=False)
    assert r.stats.examples == 0 and r.weight == math.ceil(n.splits.planned_train / 4) * 4
    if dp:  # the planned steps, each pure noise: the model moves, and the ledger holds the release
        assert r.steps == 3 and r.epsilon_spent > 0
        assert any(np.abs(r.arrays[k] - start[k]).max() > 0 for k in start)
    else:
        assert r.stats.steps == 0 and all(np.array_equal(r.arrays[k], start[k]) for k in start)
