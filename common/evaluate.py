"""Evaluation on a split: loss, accuracy, macro-F1 and per-class figures (or perplexity for causal LM)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.train import batch_loss


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: TensorDataset, *, batch_size: int) -> np.ndarray:
    """Class probabilities for every record of a tokenized classification dataset."""
    model.eval()
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
        out.append(torch.softmax(logits.float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TensorDataset, *, task: str, labels: Sequence[str],
             batch_size: int) -> dict:
    """Metrics of ``model`` on ``dataset``.

    Returns for seq-cls ``{"loss", "accuracy", "macro_f1", "n", "per_class": {label: {precision, recall,
    f1, support}}}``; for causal-lm ``{"loss", "perplexity", "n"}``.
    """
    model.eval()
    n = len(dataset)
    if n == 0:
        return {"n": 0}
    total, preds, golds = 0.0, [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        if task == "seq-cls":
            logits = model(input_ids=batch[0], attention_mask=batch[1]).logits
            total += float(F.cross_entropy(logits, batch[2], reduction="sum"))
            preds.append(logits.argmax(-1).numpy())
            golds.append(batch[2].numpy())
        else:
            total += float(batch_loss(model, batch, task=task, reduction="sum"))
    loss = total / n
    if task != "seq-cls":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": n}
    return {"loss": loss, "n": n, **classification_metrics(np.concatenate(golds), np.concatenate(preds), labels)}


def classification_metrics(gold: np.ndarray, pred: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support (scikit-learn's definitions)."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_recall_fscore_support,
    )

    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=ids, average="macro", zero_division=0)),
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(s[i])} for i, lab in enumerate(labels)},
    }
