"""Text generation from a causal LM (with or without its adapter) and ROUGE-L of generated answers.

Prompts go through the same template as training (:func:`fedtune.common.training.data.prompt_ids`), so a model
instruction-tuned by fedtune is asked the way it was taught. ROUGE-L comes from Google's ``rouge-score``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from fedtune.common.training.data import PROMPT_TAIL, prompt_ids


def _cut(ids: list[int], limit: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    tail = min(PROMPT_TAIL, limit // 2)
    return ids[:limit - tail] + ids[len(ids) - tail:]


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
             temperature: float = 0.0, max_prompt_tokens: int = 512, chat: bool = False, batch_size: int = 8,
             on_text: Callable[[str], None] | None = None) -> list[str]:
    """The model's answer to each prompt (greedy at temperature 0, else sampled).

    Args:
        max_prompt_tokens: longer prompts are cut in the middle (their start and the answer marker are kept).
        on_text: called with each new piece of text as it is generated (one prompt only): streaming output.
    """
    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming works on one prompt at a time")
    model.eval()
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [_cut(prompt_ids(tokenizer, p, chat=chat), max_prompt_tokens) for p in prompts[start:start + batch_size]]
        width = max(len(b) for b in batch)
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], dtype=torch.long, device=dev)  # left pad
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], dtype=torch.long, device=dev)
        kw: dict = {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id}
        kw.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
        if on_text is not None:
            kw["streamer"] = _Streamer(tokenizer, on_text)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kw)
        out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out


class _Streamer:
    """Hands each newly decoded piece of the answer to a callback (transformers' streamer protocol)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids += [int(v) for v in value.reshape(-1).tolist()]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.shown) and not text.endswith("\ufffd"):  # wait for whole characters
            self.on_text(text[len(self.shown):])
            self.shown = text

    def end(self) -> None:
        pass


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (with stemming) of predictions against references."""
    from rouge_score import rouge_scorer

    if not references:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(references)


def generation_metrics(model: torch.nn.Module, tokenizer, records, *, n: int, max_new_tokens: int,
                       max_prompt_tokens: int) -> dict:
    """ROUGE-L of greedy answers to the first ``n`` prompts of instruction ``records``, with three examples."""
    prompts, refs = records.texts[:n], records.responses[:n]
    if not prompts:
        return {}
    preds = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=records.chat,
                     max_prompt_tokens=max_prompt_tokens)
    return {"rouge_l": rouge_l(preds, refs), "generated": len(preds),
            "examples": [{"reference": r, "generated": p} for r, p in list(zip(refs, preds))[:3]]}
