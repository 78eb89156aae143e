"""Instruction tuning: prompt/response or chat records, the loss on response tokens only (per sequence first, as
DP-SGD's per-sample clipping needs), and truncation that keeps the response."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fedtune.common.errors import ConfigError, DataError
from fedtune.common.training import adapter, data, node
from fedtune.common.training.config import load_config
from fedtune.common.training.train import batch_loss
from helpers import FINANCE, SPORT, write_jsonl


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))
    torch.manual_seed(0)
    return tok, AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)).eval()


def _records(pairs, chat=False):
    return data.Records([p for p, _ in pairs], [], "hand-made", [], [r for _, r in pairs], chat)


def test_the_loss_mask_covers_exactly_the_response_and_its_end(tiny):
    tok, _ = tiny
    ds = data.tokenize(_records([("the match was won", "shares fell")]), tok, label_set=[], max_length=24)
    ids, attention, mask = (t[0] for t in ds.tensors)
    prompt = tok("the match was won\n")["input_ids"]
    response = tok("shares fell", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(prompt) + len(response)
    assert ids[:n].tolist() == prompt + response
    assert attention.tolist() == [1] * n + [0] * (24 - n)
    assert mask.tolist() == [0] * len(prompt) + [1] * len(response) + [0] * (24 - n)
    assert tok.decode(ids[mask.bool()]) == "shares fell" + tok.eos_token


def test_the_loss_is_the_mean_over_response_tokens_of_each_sequence(tiny):
    tok, model = tiny
    pairs = [("the match was won", "shares fell"), ("markets rallied on the news today", "a late goal")]
    ids, attention, mask = data.tokenize(_records(pairs), tok, label_set=[], max_length=24).tensors
    # Execute
    with torch.no_grad():
        per_sample = batch_loss(model, [ids, attention, mask], task="causal-lm", reduction="none")
        logits = model(input_ids=ids, attention_mask=attention).logits
        plain = batch_loss(model, [ids, attention], task="causal-lm", reduction="none")
    # Assert: an independent computation over the response positions only, one value per sequence
    for i in range(len(pairs)):
        pos = [t for t in range(1, 24) if mask[i, t]]  # token t is predicted by the logits at t - 1
        ce = F.cross_entropy(logits[i, [t - 1 for t in pos]], ids[i, pos], reduction="mean")
        torch.testing.assert_close(per_sample[i], ce)
    assert not torch.allclose(per_sample, plain)  # the prompt tokens do not count


def test_a_long_prompt_is_cut_in_the_middle_and_the_response_survives(tiny):
    tok, _ = tiny
    long_prompt = "write a headline for " + " ".join(SPORT * 10)
    ids, attention, mask = (t[0] for t in data.tokenize(_records([(long_prompt, "shares fell")]), tok, label_set=[],
                                                        max_length=32).tensors)
    response = tok("shares fell", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert int(attention.sum()) == 32 and int(mask.sum()) == len(response)
    assert ids[mask.bool()].tolist() == response
    full = tok(long_prompt + "\n")["input_ids"]
    kept = ids[:32 - len(response)].tolist()
    tail = min(data.PROMPT_TAIL, len(kept) // 2)  # the start keeps the instruction, the end the answer marker
    assert kept[:len(kept) - tail] == full[:len(kept) - tail] and kept[-tail:] == full[-tail:]
    # a response longer than the window keeps at least half of it for the prompt, and never loses every token
    p, r = data.fit_instruction(list(range(100)), list(range(1000, 1100)), 32)
    assert len(p) == 16 and r == list(range(1000, 1016))


def test_chat_records_use_the_tokenizers_template(tiny, tmp_path):
    tok, _ = tiny
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "the match was won"},
                          {"role": "assistant", "content": "shares fell"}]}]
    recs = data.read_instructions(write_jsonl(tmp_path / "chat.jsonl", rows), prompt_column="text",
                                  messages_column="messages")
    assert recs.chat and recs.responses == ["shares fell"]
    ids, _, mask = (t[0] for t in data.tokenize(recs, tok, label_set=[], max_length=48).tensors)
    expected = tok.apply_chat_template([{"role": "user", "content": "the match was won"}],
                                       add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected)
    assert ids[:len(expected)].tolist() == expected and int(mask[:len(expected)].sum()) == 0
    assert tok.decode(ids[mask.bool()]) == "shares fell" + tok.eos_token


def test_bad_instruction_records_and_settings_are_one_clear_error(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="ending with the assistant"):
        data.read_instructions(bad, prompt_column="text", messages_column="messages")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "hi", "response": " "}])
    with pytest.raises(DataError, match="empty 'response'"):
        data.read_instructions(empty, prompt_column="prompt", response_column="response")
    with pytest.raises(DataError, match="no column 'answer'"):
        data.read_instructions(empty, prompt_column="prompt", response_column="answer")
    with pytest.raises(ConfigError, match="model.task=causal-lm"):
        load_config({"data.response-column": "response"})


def test_instruction_tuning_under_dp_moves_lora_and_lowers_response_loss(tmp_path, tiny_gpt2_dir):
    # Prepare: 200 prompt/response pairs where the response follows from the prompt
    rows = [{"prompt": f"{s} (story {i})", "response": ("sport" if s in SPORT else "money")}
            for i, s in enumerate((SPORT + FINANCE) * 13)][:200]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config({"model.path": str(tiny_gpt2_dir), "model.task": "causal-lm", "model.max-length": 24,
                       "lora.target-modules": "c_attn", "data.path": str(path), "data.text-column": "prompt",
                       "data.response-column": "response", "train.batch-size": 16, "train.local-steps": 30,
                       "train.lr": 0.05, "privacy.target-epsilon": 8})
    n = node.prepare(cfg, node.NodePolicy(source="pairs", max_epsilon=8), state_dir=tmp_path / "state")
    assert len(n.train_set.tensors) == 3
    before = node.evaluate_split(n, "test")
    start = adapter.pack(n.lora.model, ffa=False)
    # Execute
    result = node.train_round(n, job="pairs", round=1, federated=False)
    after = node.evaluate_split(n, "test")
    # Assert: every LoRA tensor moved and the response perplexity fell
    assert all(not np.allclose(result.arrays[k], start[k]) for k in start if "lora_" in k)
    assert after["perplexity"] < before["perplexity"] * 0.8, (before, after)
    assert 0 < result.epsilon_spent <= 8
    assert json.loads(json.dumps(after))  # plain numbers


@pytest.mark.slow
def test_llm_baselines_score_perplexity_and_rouge_in_one_table(tmp_path, tiny_gpt2_dir):
    from fedtune.simulations.baselines import run_all
    from fedtune.simulations.report import baseline_table

    rows = [{"prompt": f"{s} (story {i})", "response": ("sport" if s in SPORT else "money")}
            for i, s in enumerate((SPORT + FINANCE) * 13)][:150]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config({"model.path": str(tiny_gpt2_dir), "model.task": "causal-lm", "model.max-length": 24,
                       "lora.target-modules": "c_attn", "data.path": str(path), "data.text-column": "prompt",
                       "data.response-column": "response", "train.batch-size": 8, "train.local-steps": 2,
                       "train.rounds": 1, "fed.num-nodes": 3, "fed.min-nodes": 3, "sim.partitioner": "iid",
                       "sim.baseline-epochs": 0.5, "model.eval-generate": 4, "model.max-new-tokens": 3,
                       "fed.run-dir": str(tmp_path / "run"), "fed.node-wait-timeout": 120})
    run_dir, results = run_all(cfg, with_nodp=False, out=lambda s: None)
    names = [r["name"] for r in results]
    assert names[:2] == ["federated, DP (this run)", "base model, zero-shot"]
    assert {"centralized, DP", "centralized, no DP"} <= set(names)
    for r in results:
        assert not r.get("error"), r
        assert r["perplexity"] > 1 and 0.0 <= r["rouge_l"] <= 1.0, r
    table = baseline_table(results)
    assert table[0].startswith("| setting | response perplexity | ROUGE-L |") and len(table) == 2 + len(results)
