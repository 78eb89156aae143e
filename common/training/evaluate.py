"""Evaluation on a split: loss, accuracy, macro-F1 and per-class figures (or perplexity for causal LM)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from fedtune.common.training.train import batch_loss
from torch.utils.data import DataLoader, TensorDataset

if TYPE_CHECKING:  # wire imports this module (LM_LOSS_CLIP): the type only, no import cycle
    from fedtune.common.training.wire import EvalAnswer


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: TensorDataset, *, batch_size: int) -> np.ndarray:
    """Class probabilities for every record of a tokenized classification dataset."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        logits = model(input_ids=batch[0].to(dev), attention_mask=batch[1].to(dev)).logits
        out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TensorDataset, *, task: str, labels: Sequence[str],
             batch_size: int, groups: Sequence[str] | None = None) -> dict:
    """Metrics of ``model`` on ``dataset``.

    Returns for seq-cls ``{"loss", "accuracy", "macro_f1", "n", "per_class": {label: {precision, recall,
    f1, support}}}``; for causal-lm ``{"loss", "perplexity", "n"}``.
    """
    model.eval()
    n = len(dataset)
    if n == 0:
        return {"n": 0}
    total, preds, golds = 0.0, [], []
    dev = next(model.parameters()).device
    for batch in DataLoader(dataset, batch_size=batch_size):
        batch = [t.to(dev) for t in batch]
        if task == "seq-cls":
            logits = model(input_ids=batch[0], attention_mask=batch[1]).logits.float()
            total += float(F.cross_entropy(logits, batch[2], reduction="sum"))
            preds.append(logits.argmax(-1).cpu().numpy())
            golds.append(batch[2].cpu().numpy())
        else:
            total += float(batch_loss(model, batch, task=task, reduction="sum"))
    loss = total / n
    if task != "seq-cls":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": n}
    gold, pred = np.concatenate(golds), np.concatenate(preds)
    out = {"loss": loss, "n": n, **classification_metrics(gold, pred, labels)}
    if groups:  # the fairness audit (data.group-column)
        from fedtune.common.training.fairness import audit

        out["fairness"] = audit(gold, pred, groups, labels)
    return out


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
                            "support": int(s[i]), "predicted": int((pred == i).sum())} for i, lab in enumerate(labels)},
    }


LM_LOSS_CLIP = 10.0  # nats: a sequence's loss is clipped to this before it is counted in a private answer


@torch.no_grad()
def private_counts(model: torch.nn.Module, dataset: TensorDataset, *, task: str, batch_size: int) -> np.ndarray:
    """The vector a node releases (with noise) to answer a federated evaluation.

    seq-cls: ``[correct, wrong]``, so one record changes one coordinate by one (L2 sensitivity 1).
    causal-lm: ``[records, sum of per-sequence losses clipped to LM_LOSS_CLIP, / LM_LOSS_CLIP]``
    (L2 sensitivity sqrt(2)). Counts, never a metric: the server derives accuracy from the noised counts.
    """
    model.eval()
    dev = next(model.parameters()).device
    out = np.zeros(2, np.float64)
    for batch in DataLoader(dataset, batch_size=batch_size):
        if task == "seq-cls":
            pred = model(input_ids=batch[0].to(dev), attention_mask=batch[1].to(dev)).logits.argmax(-1).cpu()
            right = int((pred == batch[2]).sum())
            out += (right, len(batch[2]) - right)
        else:
            losses = batch_loss(model, [t.to(dev) for t in batch], task=task, reduction="none").float()
            # every record adds at most LM_LOSS_CLIP, whatever the model: a NaN or infinite loss counts as the clip
            # (clamp alone lets NaN through, and one NaN would turn the whole answer into a membership signal)
            losses = torch.nan_to_num(losses, nan=LM_LOSS_CLIP, posinf=LM_LOSS_CLIP, neginf=0.0)
            losses = losses.clamp(0.0, LM_LOSS_CLIP)
            out += (len(losses), float(losses.sum()) / LM_LOSS_CLIP)
    return out


def pool_answers(answers: Mapping[str, EvalAnswer], *, failed: list[str], task: str,
                 about: Mapping[str, Mapping] | None = None) -> dict:
    """Federated-evaluation figures from nodes' noised answers (see :func:`private_counts`).

    ``answers``: each node's parsed :class:`~fedtune.common.training.wire.EvalAnswer` under the key its figures
    are recorded by; ``about``: what the record keeps beside them per node (its name, its accountant).
    A node's answer is counts plus Gaussian noise (``noise_std``): its own accuracy is an
    estimate with that noise, the pooled figure sums every node's counts first. Counts are
    clamped at zero and accuracies to [0, 1]; a node whose noised total is not positive has no figure.
    """
    figures = {key: {**(about or {}).get(key, {}), **a.figures(task)} for key, a in answers.items()}
    per: dict[str, dict] = {}
    for name, m in figures.items():
        if task == "seq-cls":
            right, wrong = max(0.0, float(m.get("correct", 0.0))), max(0.0, float(m.get("wrong", 0.0)))
            total = right + wrong
            per[name] = {**m, "accuracy": (right / total) if total > 0 else None}
        else:
            recs, loss = max(0.0, float(m.get("records", 0.0))), max(0.0, float(m.get("loss_sum", 0.0)))
            per[name] = {**m, "loss": (loss / recs) if recs >= 1 else None}
    out: dict = {"nodes": len(per), "failed": failed, "per_node": per, "noised": True}
    if task == "seq-cls":
        right = sum(max(0.0, float(m.get("correct", 0.0))) for m in figures.values())
        total = right + sum(max(0.0, float(m.get("wrong", 0.0))) for m in figures.values())
        accs = {n: p["accuracy"] for n, p in per.items() if p["accuracy"] is not None}
        out.update(accuracy=min(1.0, right / total) if total > 0 else None,
                   worst_accuracy=min(accs.values()) if accs else None,
                   worst_node=min(accs, key=accs.get) if accs else None)
    else:
        recs = sum(max(0.0, float(m.get("records", 0.0))) for m in figures.values())
        loss = sum(max(0.0, float(m.get("loss_sum", 0.0))) for m in figures.values())
        out.update(loss=loss / recs if recs >= 1 else None)
    return out
