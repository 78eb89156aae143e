"""The fairness audit (``data.group-column``): how the model does for each group of the server's held-out data.

Per group: accuracy, macro-F1 and the record count (fairlearn's ``MetricFrame``); across groups: the
largest accuracy and macro-F1 gaps, and fairlearn's demographic-parity and equalized-odds differences.
Those two are defined for a binary outcome: for two labels the positive class is the second label of
``data.labels``; for more labels each class is taken one-vs-rest and the largest difference is
reported (with the class it comes from). The audit runs on data the server holds; nodes' own
records are not audited (a per-group answer from a node would be another release to account).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np

MIN_GROUP = 1  # groups with fewer records than this are listed but not used for gaps


def audit(gold: np.ndarray, pred: np.ndarray, groups: Sequence[str], labels: Sequence[str]) -> dict:
    """Per-group figures and the gaps between groups (see the module docstring)."""
    from fairlearn.metrics import (
        MetricFrame,
        count,
        demographic_parity_difference,
        equalized_odds_difference,
    )
    from sklearn.metrics import accuracy_score, f1_score

    g = np.asarray(list(groups))
    ids = list(range(len(labels)))
    frame = MetricFrame(metrics={"accuracy": accuracy_score,
                                 "macro_f1": partial(f1_score, labels=ids, average="macro", zero_division=0),
                                 "n": count},
                        y_true=gold, y_pred=pred, sensitive_features=g)
    by = frame.by_group
    per_group = {str(k): {"accuracy": float(by.loc[k, "accuracy"]), "macro_f1": float(by.loc[k, "macro_f1"]),
                          "n": int(by.loc[k, "n"])} for k in by.index}
    out = {"groups": per_group, "accuracy_gap": float(frame.difference()["accuracy"]),
           "macro_f1_gap": float(frame.difference()["macro_f1"])}
    classes = [1] if len(labels) == 2 else ids
    dp, eo = [], []
    for c in classes:
        yt, yp = (gold == c).astype(int), (pred == c).astype(int)
        dp.append((float(demographic_parity_difference(yt, yp, sensitive_features=g)), labels[c]))
        eo.append((float(equalized_odds_difference(yt, yp, sensitive_features=g)), labels[c]))
    out["demographic_parity_difference"], out["demographic_parity_class"] = max(dp)
    out["equalized_odds_difference"], out["equalized_odds_class"] = max(eo)
    worst = min(per_group, key=lambda k: per_group[k]["accuracy"])
    out["worst_group"] = worst
    return out
