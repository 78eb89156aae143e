"""Use an exported causal LM: answer prompts, streamed, from the Python API or ``fedtune generate``.

    from fedtune.common.serving.generation import Generator
    gen = Generator("exports/llm-v1")                    # or Generator.from_registry("registry")
    print(gen.generate("Write a headline for this news article.\n\n<article text>"))

The export is a merged model (stock ``AutoModelForCausalLM``); prompts are wrapped in the tokenizer's chat
template exactly as in training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from fedtune.common.errors import DataError, ModelError


class Generator:
    """A causal LM loaded from an exported directory (or any Hugging Face causal-LM directory)."""

    def __init__(self, directory: str | Path, *, device: str = "auto", verify: bool = True) -> None:
        from fedtune.common.serving import export
        from fedtune.common.training.model import resolve_device
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        d, self.record = export.open_export(directory, task="causal-lm", verify_files=verify)
        self.directory = d
        model_rec = (self.record or {}).get("model", {})
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a causal LM from {d}: {e}",
                             "re-export the run; the directory is damaged or not a causal LM") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.max_prompt_tokens = int(model_rec.get("max_length") or 512)
        self.default_new_tokens = int(model_rec.get("max_new_tokens") or 64)

    @classmethod
    def from_registry(cls, registry: str | Path, version: str | None = None, **kw) -> Generator:
        """The registry's current version (or ``version``), after checking its files' hashes."""
        from fedtune.common.serving.registry import Registry

        return cls(Registry(registry).resolve(version), verify=False, **kw)

    def generate(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float = 0.0,
                 on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to ``prompt`` (greedy at temperature 0); ``on_text`` receives it piece by piece."""
        from fedtune.common.training.generate import generate

        if not prompt.strip():
            raise DataError("the prompt is empty", "give a prompt as an argument, with --file, or on stdin")
        if temperature < 0:
            raise DataError(f"temperature must be >= 0, got {temperature}", "pass --temperature 0 for greedy output")
        n = int(max_new_tokens or self.default_new_tokens)
        if n < 1:
            raise DataError(f"max-new-tokens must be at least 1, got {n}", "pass --max-new-tokens 64")
        return generate(self.model, self.tokenizer, [prompt], max_new_tokens=n, temperature=temperature,
                        max_prompt_tokens=self.max_prompt_tokens, on_text=on_text)[0]
