"""Drift check: evaluate a version on an organization's fresh labelled data, locally, and compare it with
the figures recorded when the version was exported.

Nothing leaves the node: the data is read, labelled and scored in this process, and the report is
printed (or written to a local file). Accuracy and macro-F1 are compared with the export's test
figures; a drop of more than ``threshold`` (absolute) in either is reported as drift. The 95%
Clopper-Pearson interval of the fresh accuracy (scipy) says how much of a gap small samples explain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fedtune.common.errors import DataError, ModelError
from fedtune.common.serving.inference import Classifier
from fedtune.common.training.evaluate import classification_metrics

SMALL_SAMPLE = 100


def read_labelled(path: str | Path, clf: Classifier, *, text_column: str, label_column: str):
    """The fresh records, checked against the model's label set."""
    from fedtune.common.training.data import read_records

    try:
        return read_records(path, text_column=text_column, label_column=label_column, labels=clf.labels)
    except DataError as e:
        if "label set" in e.problem:
            raise DataError(e.problem.replace("the job's label set", "the model's label set"),
                            f"this model knows only {', '.join(clf.labels)}: relabel or drop the other records "
                            "before checking") from None
        if "data." in e.fix:  # the training settings' names do not apply here
            e = DataError(e.problem, e.fix.replace("data.text-column", "--text-column")
                          .replace("data.label-column", "--label-column").replace("data.path", "--data"))
        raise e from None


def check(clf: Classifier, texts: list[str], gold_labels: list[str], *, threshold: float) -> dict:
    """Fresh metrics vs the export's, with the verdict ``ok`` or ``drift``."""
    from scipy.stats import binomtest

    if clf.record is None or not (clf.record.get("metrics") or {}).get("test"):
        raise ModelError(f"{clf.directory} has no metrics recorded at export",
                         "check a version made by `fedtune export` / `fedtune registry add`")
    if not 0 < threshold < 1:
        raise DataError(f"--threshold must be between 0 and 1 (an absolute drop), got {threshold}",
                        "use e.g. --threshold 0.05 for five accuracy points")
    index = {lab: i for i, lab in enumerate(clf.labels)}
    probs = clf.predict_proba(texts)
    gold = np.array([index[lab] for lab in gold_labels])
    fresh = classification_metrics(gold, probs.argmax(-1), clf.labels)
    ref = clf.record["metrics"]["test"]
    ref_pc = clf.record["metrics"].get("per_class") or {}
    n = len(texts)
    ci = binomtest(int(round(fresh["accuracy"] * n)), n).proportion_ci(0.95)
    drops = {k: ref[k] - fresh[k] for k in ("accuracy", "macro_f1") if ref.get(k) is not None}
    per_class = {lab: {"f1": c["f1"], "support": c["support"], "recorded_f1": ref_pc.get(lab, {}).get("f1"),
                       "drop": (ref_pc[lab]["f1"] - c["f1"]) if lab in ref_pc and c["support"] else None}
                 for lab, c in fresh["per_class"].items()}
    drifted = [k for k, d in drops.items() if d > threshold]
    return {
        "verdict": "drift" if drifted else "ok", "drifted": drifted, "threshold": threshold, "n": n,
        "fresh": {"accuracy": fresh["accuracy"], "macro_f1": fresh["macro_f1"],
                  "accuracy_ci95": [float(ci.low), float(ci.high)]},
        "recorded": {"accuracy": ref.get("accuracy"), "macro_f1": ref.get("macro_f1"), "n": ref.get("n")},
        "drop": drops, "per_class": per_class,
        "classes_dropped": sorted(lab for lab, c in per_class.items()
                                  if c["drop"] is not None and c["drop"] > threshold),
        "small_sample": n < SMALL_SAMPLE,
        "version": {"directory": str(clf.directory), "source_run": clf.record["source"]["run"],
                    "round": clf.record["source"]["round"], "weights_sha256": clf.record.get("weights_sha256")},
    }


def report_lines(r: dict) -> list[str]:
    f, rec = r["fresh"], r["recorded"]
    lines = [f"drift check of {r['version']['directory']} (run {r['version']['source_run']}, round "
             f"{r['version']['round']}) on {r['n']} fresh records, threshold {r['threshold']:g}:",
             f"  accuracy  recorded {rec['accuracy']:.4f}  fresh {f['accuracy']:.4f} (95% CI "
             f"{f['accuracy_ci95'][0]:.3f}-{f['accuracy_ci95'][1]:.3f})  drop {r['drop']['accuracy']:+.4f}",
             f"  macro-F1  recorded {rec['macro_f1']:.4f}  fresh {f['macro_f1']:.4f}  "
             f"drop {r['drop']['macro_f1']:+.4f}"]
    for lab, c in r["per_class"].items():
        mark = "  <- dropped" if lab in r["classes_dropped"] else ""
        recf = "-" if c["recorded_f1"] is None else f"{c['recorded_f1']:.3f}"
        lines.append(f"    {lab:>16}: f1 recorded {recf}  fresh {c['f1']:.3f} (n={c['support']}){mark}")
    if r["small_sample"]:
        lines.append(f"  note: only {r['n']} records; differences this small samples show are often noise "
                     "(see the interval)")
    lines.append(f"verdict: {'DRIFT' if r['verdict'] == 'drift' else 'ok'}"
                 + (f" ({', '.join(r['drifted'])} dropped by more than {r['threshold']:g})" if r["drifted"] else ""))
    return lines
