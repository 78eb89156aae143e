"""Skewed labels: class weights, the majority-class baseline, and a model that learned nothing.

Class weights must not come from the records DP protects: a weight computed from a node's own
training labels would make every sample's loss depend on every other record. fedtune derives them
from the labels of data the *server* holds (its held-out split; in a simulation the global
validation and test splits), sends them with each round, and a node checks their bounds. Under
DP-SGD per-sample clipping bounds each record's influence whatever fixed weights scale its loss,
so the accounting is unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

WEIGHTINGS = ("auto", "balanced", "none")
SKEW = 1.5  # auto: weight when the majority class holds at least 1.5x its balanced share
MAX_WEIGHT = 20.0  # bounds a node accepts on a class weight, and what balanced weights are clipped to
MIN_WEIGHT = 1.0 / MAX_WEIGHT


def class_weights(labels: Sequence[str], label_set: Sequence[str], mode: str) -> list[float] | None:
    """Inverse-frequency weights ``n / (k * n_c)`` (mean 1 over records), or None when not weighting.

    ``auto`` weights only skewed labels (majority share >= SKEW / k); a class absent from ``labels``
    gets the largest weight allowed."""
    if mode == "none" or len(label_set) < 2 or not labels:
        return None
    counts = Counter(labels)
    k, n = len(label_set), len(labels)
    if mode == "auto" and max(counts.values()) / n < SKEW / k:
        return None
    return [min(MAX_WEIGHT, max(MIN_WEIGHT, n / (k * counts[lab]))) if counts.get(lab) else MAX_WEIGHT
            for lab in label_set]


def majority_baseline(labels: Sequence[str], label_set: Sequence[str]) -> dict | None:
    """What always answering the most common label scores on ``labels``: the floor a model must beat."""
    if not labels or not label_set:
        return None
    lab, c = Counter(labels).most_common(1)[0]
    p = c / len(labels)
    return {"label": lab, "accuracy": p, "macro_f1": 2 * p / (1 + p) / len(label_set), "n": len(labels)}


def learned_nothing(metrics: dict | None, baseline: dict | None, *, margin: float = 0.01) -> str | None:
    """Why these test metrics look like a model that learned nothing (None if they do not).

    Fires when predictions collapse onto one class (>= 95% of them) or accuracy is not above the
    majority-class baseline by ``margin``."""
    if not metrics or not baseline or "per_class" not in metrics:
        return None
    predicted = {lab: c.get("predicted", 0) for lab, c in metrics["per_class"].items()}
    total = sum(predicted.values())
    top = max(predicted, key=predicted.get) if total else None
    if top is not None and predicted[top] >= 0.95 * total:
        return (f"{predicted[top] / total:.0%} of test predictions are {top!r}: the model collapsed onto one class "
                f"(accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}; always answering "
                f"{baseline['label']!r} scores {baseline['accuracy']:.4f})")
    if metrics["accuracy"] <= baseline["accuracy"] + margin:
        return (f"test accuracy {metrics['accuracy']:.4f} is not above the majority-class baseline "
                f"{baseline['accuracy']:.4f} (always answering {baseline['label']!r}); macro-F1 "
                f"{metrics['macro_f1']:.4f}")
    return None


def what_to_try(weighted: bool, head_only: bool = False, pooling: str = "mean") -> str:
    """The advice that goes with a learned-nothing warning (nothing the run already did)."""
    if head_only:
        other = ("the head on mean-pooled features (model.pooling=mean), or " if pooling != "mean" else "") + \
            "adapting the encoder (FFA-LoRA: lora.head-only=false train.lr=2 train.local-epochs=1 train.batch-size=32)"
    else:
        other = ("the default head-only recipe (lora.head-only=true model.pooling=mean train.lr=20 "
                 "privacy.max-grad-norm=0.5 train.local-epochs=3 train.batch-size=128: `fedtune simulate demo data.path=...`)")
    return ("try " + ("" if weighted else "train.class-weighting=balanced, ") + "more train.rounds or "
            f"train.local-epochs, a higher train.lr, {other}, or search the recipe on your data with `fedtune tune`")
