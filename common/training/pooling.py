"""Mean pooling for a sequence classifier's head (``model.pooling=mean``).

A BERT-style classifier's head reads the model's pooler (a dense layer over the first token). A
sentence-embedding model such as the packaged all-MiniLM-L6-v2 was trained for the mean of its last
hidden states instead, and that feature is what separates short texts and question types for a head
trained under DP. :func:`attach_mean_pooling` swaps the pooler for :class:`MeanPooler` in place.

This file imports only torch: ``fedtune export`` copies it verbatim next to a mean-pooled model, so
``AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)`` loads the model
anywhere without fedtune (see :func:`remote_code`).
"""

from __future__ import annotations

import torch

MARK = "fedtune_pooling"  # config key of a mean-pooled model ("mean")


class MeanPooler(torch.nn.Module):
    """Stands in for a BERT-style pooler: the L2-normalised mean of the last hidden states over the text's
    tokens (padding excluded). A pooler sees only the hidden states, so the attention mask reaches it
    through a pre-hook on the encoder. It has no weights: nothing here is trained or exchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.mask = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        m = mask.to(hidden_states.dtype).unsqueeze(-1)
        mean = (hidden_states * m).sum(1) / m.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean, dim=-1)


def attach_mean_pooling(model: torch.nn.Module) -> None:
    """Make ``model``'s classification head read mean-pooled features, in place.

    Raises:
        ValueError: the model has no BERT-style pooler to replace.
    """
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ValueError(f"{type(model).__name__} has no encoder with a pooler (BERT family) to replace")
    pooler = MeanPooler()
    encoder.pooler = pooler

    # the hooks find the pooler through the module they are called on, never a closure: a copy of the model
    # (copy.deepcopy) must set its own pooler's mask, not the original's (it silently pooled over padding)
    def keep_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        module.pooler.mask = args[1] if mask is None and len(args) > 1 else mask

    def drop_mask(module, _args, _kwargs, _output):
        module.pooler.mask = None

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)
    encoder.register_forward_hook(drop_mask, with_kwargs=True)
    model.config.update({MARK: "mean"})
