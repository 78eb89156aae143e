"""Causal-LM fine-tuning goes through the same machinery (tiny GPT-2 built from a config)."""

from __future__ import annotations

import numpy as np
from fedtune.common.training import adapter, node
from fedtune.common.training.config import load_config
from helpers import FINANCE, SPORT, write_jsonl


def test_causal_lm_trains_with_dp_and_reloads(tmp_path, tiny_gpt2_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Prepare: 200 short texts, text column only
    rows = [{"text": f"{s} on day {i}"} for i, s in enumerate((SPORT + FINANCE) * 13)][:200]
    path = write_jsonl(tmp_path / "texts.jsonl", rows)
    cfg = load_config({"model.path": str(tiny_gpt2_dir), "model.task": "causal-lm", "model.max-length": 16,
                       "lora.target-modules": "c_attn", "data.path": str(path), "train.batch-size": 16,
                       "train.local-steps": 30, "train.lr": 0.02, "privacy.target-epsilon": 8})
    n = node.prepare(cfg, node.NodePolicy(source="lm", max_epsilon=8), state_dir=tmp_path / "state")
    before = node.evaluate_split(n, "test")
    start = adapter.pack(n.lora.model, ffa=False)
    # Execute
    result = node.train_round(n, job="lm", round=1, federated=False)
    after = node.evaluate_split(n, "test")
    out = adapter.save_adapter(n.lora.model, tmp_path / "adapter")
    # Assert: it learned, the LoRA weights moved, privacy was accounted, stock PEFT reloads it
    assert set(before) == {"loss", "perplexity", "n"}
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert all(not np.allclose(result.arrays[k], start[k]) for k in start if "lora_B" in k)
    assert 0 < result.epsilon_spent <= 8
    base = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir))
    stock = PeftModel.from_pretrained(base, str(out)).eval()
    ids = n.test_set.tensors[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, n.lora.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
