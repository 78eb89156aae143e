"""The fairness audit (``data.group-column``): how the model does for each group of held-out data.

Per group: accuracy, macro-F1 and the record count (fairlearn's ``MetricFrame``); across groups: the
largest accuracy and macro-F1 gaps, and fairlearn's demographic-parity and equalized-odds differences.
Those two are defined for a binary outcome: for two labels the positive class is the second label of
``data.labels``; for more labels each class is taken one-vs-rest and the largest difference is
reported (with the class it comes from).

Two audits use it. The server audits its own held-out data exactly. Nodes audit theirs under their
privacy rules: a node that has a group column (simulated nodes: the job's; deployed nodes: only their
own node config's ``group-column``) answers a federated evaluation with a per-group confusion histogram
(:func:`node_cells`) instead of its (correct, wrong) counts. One record changes one cell by one, so the
histogram has the same L2 sensitivity (1) as the two counts: it gets the same Gaussian noise and the
same ledger entry, and costs no more privacy. The groups are the server's list (never the node's own
names, which would reveal that a record exists); the node's records of any other group go to a last
"other" cell row. The server sums the noised histograms of all nodes (:func:`pool_cells`) and audits
the sum with the cells as sample weights: figures that are estimates, as the report says.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np

MAX_GROUPS = 64  # groups a server may ask nodes to audit (each adds labels^2 noised cells to an answer)
MAX_GROUP_NAME = 100


def audit(gold: np.ndarray, pred: np.ndarray, groups: Sequence[str], labels: Sequence[str],
          weights: np.ndarray | None = None) -> dict:
    """Per-group figures and the gaps between groups (see the module docstring).

    ``weights`` (optional, non-negative) weigh each record: the pooled noised histogram of nodes' answers
    is audited as one record per cell weighted by its noised count.
    """
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        equalized_odds_difference,
    )
    from sklearn.metrics import accuracy_score, f1_score

    g = np.asarray(list(groups))
    ids = list(range(len(labels)))
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    params = None if w is None else {"accuracy": {"sample_weight": w}, "macro_f1": {"sample_weight": w}}
    frame = MetricFrame(metrics={"accuracy": accuracy_score,
                                 "macro_f1": partial(f1_score, labels=ids, average="macro", zero_division=0)},
                        y_true=gold, y_pred=pred, sensitive_features=g, sample_params=params)
    by = frame.by_group
    per_group = {str(k): {"accuracy": float(by.loc[k, "accuracy"]), "macro_f1": float(by.loc[k, "macro_f1"]),
                          "n": int(round(float(np.sum(w[g == k]) if w is not None else np.sum(g == k))))}
                 for k in by.index}
    out = {"groups": per_group, "accuracy_gap": float(frame.difference()["accuracy"]),
           "macro_f1_gap": float(frame.difference()["macro_f1"])}
    classes = [1] if len(labels) == 2 else ids
    dp, eo = [], []
    for c in classes:
        yt, yp = (gold == c).astype(int), (pred == c).astype(int)
        dp.append((float(demographic_parity_difference(yt, yp, sensitive_features=g, sample_weight=w)), labels[c]))
        eo.append((float(equalized_odds_difference(yt, yp, sensitive_features=g, sample_weight=w)), labels[c]))
    out["demographic_parity_difference"], out["demographic_parity_class"] = max(dp)
    out["equalized_odds_difference"], out["equalized_odds_class"] = max(eo)
    worst = min(per_group, key=lambda k: per_group[k]["accuracy"])
    out["worst_group"] = worst
    return out


def audit_groups(groups: Sequence[str]) -> tuple[str, ...]:
    """The groups the server asks nodes to audit: those of its own held-out data, most frequent first
    (at most :data:`MAX_GROUPS`), in a fixed order every node reads the same way."""
    names, counts = np.unique(np.asarray([str(x)[:MAX_GROUP_NAME] for x in groups]), return_counts=True)
    ranked = sorted(zip(names.tolist(), counts.tolist()), key=lambda t: (-t[1], t[0]))[:MAX_GROUPS]
    return tuple(sorted(n for n, _ in ranked))


def node_cells(gold: np.ndarray, pred: np.ndarray, groups: Sequence[str], asked: Sequence[str],
               n_labels: int) -> np.ndarray:
    """A node's exact per-group confusion histogram, flattened: cell ``(g, y, p)`` counts the records of
    group ``asked[g]`` (the last row: any other group) with gold label ``y`` predicted as ``p``."""
    index = {name: i for i, name in enumerate(asked)}
    cells = np.zeros((len(asked) + 1, n_labels, n_labels), np.float64)
    for grp, y, p in zip(groups, np.asarray(gold).tolist(), np.asarray(pred).tolist()):
        cells[index.get(str(grp), len(asked)), int(y), int(p)] += 1
    return cells.reshape(-1)


def cells_counts(cells: np.ndarray, n_labels: int) -> tuple[float, float]:
    """(correct, wrong) from a histogram: the diagonal and the rest (post-processing, no new release)."""
    c = np.asarray(cells, np.float64).reshape(-1, n_labels, n_labels)
    right = float(np.trace(c, axis1=1, axis2=2).sum())
    return right, float(c.sum() - right)


def pool_cells(answers: Sequence[np.ndarray], asked: Sequence[str], labels: Sequence[str]) -> dict | None:
    """The audit of nodes' summed noised histograms (negative cells count as zero), or None when no node
    sent one of the right shape. ``other_records``: the (noised) records of groups the server did not list."""
    size = (len(asked) + 1) * len(labels) ** 2
    ok = [np.asarray(a, np.float64) for a in answers if a is not None and len(a) == size]
    if not ok or not asked:
        return None
    k = len(labels)
    total = np.clip(np.sum(ok, axis=0), 0.0, None).reshape(len(asked) + 1, k, k)
    g, y, p = np.nonzero(total[:-1] > 0)
    present = {int(i) for i in g}
    if not present:
        return None
    out = audit(y, p, [asked[i] for i in g], labels, weights=total[g, y, p])
    return {**out, "noised": True, "nodes": len(ok), "other_records": float(total[-1].sum()),
            "groups_without_records": sorted(asked[i] for i in range(len(asked)) if i not in present)}
