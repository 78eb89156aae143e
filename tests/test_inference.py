"""Inference on an exported model (files, stdin, edge cases as documented) and the local drift check."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from fedtune.cli import main
from fedtune.common.serving.inference import Classifier

TEXTS = ["Shares in the bank fell after it reported lower profits.",
         "The striker scored twice as the club won the cup final.",
         "The minister announced a new election date.",
         "A new smartphone chip promises longer battery life.",
         "The film won three awards at the festival."]


@pytest.fixture(scope="module")
def clf(tiny_export) -> Classifier:
    return Classifier(tiny_export, batch_size=2)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_api_predictions_match_the_stock_model(clf, tiny_export):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_export))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_export)).eval()
    with torch.no_grad():
        logits = model(**tok(TEXTS, padding=True, truncation=True, max_length=clf.max_length,
                             return_tensors="pt")).logits
    expected = torch.softmax(logits, -1).numpy()
    seen = []
    probs = clf.predict_proba(TEXTS, progress=lambda done, total: seen.append((done, total)))
    assert np.allclose(probs, expected, atol=1e-5)  # batches of 2 pad differently; rounding only
    assert seen == [(2, 5), (4, 5), (5, 5)]
    preds = clf.predict(["", "   ", *TEXTS])
    assert [p.status for p in preds[:2]] == ["empty", "empty"] and preds[0].label is None
    for p, row in zip(preds[2:], expected, strict=True):
        assert p.label == clf.labels[int(row.argmax())] and p.score == pytest.approx(float(row.max()), abs=1e-5)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert clf.max_length == json.loads((tiny_export / "fedtune-export.json").read_text())["model"]["max_length"]


def _edge_file(path):
    """UTF-8 BOM, CRLF, blank and whitespace lines, one latin-1 line, no final newline."""
    path.write_bytes(b"\xef\xbb\xbf" + TEXTS[0].encode() + b"\r\n\n   \n" + TEXTS[1].encode() + b"\n"
                     + "Caf\u00e9 owners cheered the minister".encode("latin-1") + b"\n" + TEXTS[2].encode())
    return path


def test_predict_file_edge_cases_as_documented(clf, tiny_export, tmp_path, capsys):
    src = _edge_file(tmp_path / "texts.txt")
    out = tmp_path / "labels.csv"
    # default: a non-UTF-8 line stops the command before anything is labelled or written
    code, _, err = _cli(capsys, "predict", str(src), "--model", str(tiny_export), "--out", str(out))
    assert code == 1 and "line 5 is not valid UTF-8 (byte 0xe9" in err and "--on-bad-bytes" in err
    assert "Traceback" not in err and not out.exists()
    # replace: every input line gets one output row, in order, with its status
    code, _, err = _cli(capsys, "predict", str(src), "--model", str(tiny_export), "--out", str(out),
                        "--on-bad-bytes", "replace", "--include-text")
    assert code == 0, err
    assert "labelled 4 texts" in err and "empty 2" in err and "replaced-bytes 1" in err
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [r["line"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [r["status"] for r in rows] == ["ok", "empty", "empty", "ok", "replaced-bytes", "ok"]
    assert rows[0]["text"] == TEXTS[0]  # BOM and CR removed
    assert rows[4]["text"] == "Caf\ufffd owners cheered the minister"
    assert rows[1]["label"] == "" and rows[1]["score"] == ""
    expected = clf.predict([TEXTS[0], TEXTS[1], rows[4]["text"], TEXTS[2]])
    for r, p in zip([rows[0], rows[3], rows[4], rows[5]], expected, strict=True):
        assert r["label"] == p.label and float(r["score"]) == pytest.approx(p.score, abs=1e-5)
        assert sum(float(r[f"p_{lab}"]) for lab in clf.labels) == pytest.approx(1.0, abs=1e-4)
    # skip: the bad line keeps its row, unlabelled; JSON Lines chosen from the suffix
    jl = tmp_path / "labels.jsonl"
    code, _, err = _cli(capsys, "predict", str(src), "--model", str(tiny_export), "--out", str(jl),
                        "--on-bad-bytes", "skip", "--quiet")
    assert code == 0, err
    recs = [json.loads(x) for x in jl.read_text().splitlines()]
    assert [r["status"] for r in recs] == ["ok", "empty", "empty", "ok", "invalid-utf8", "ok"]
    assert recs[4]["label"] is None and set(recs[0]["probabilities"]) == set(clf.labels)


def test_predict_table_input_and_input_errors(tiny_export, tmp_path, capsys):
    table = tmp_path / "in.jsonl"
    table.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS[:3] + [""])))
    code, out, err = _cli(capsys, "predict", str(table), "--model", str(tiny_export), "--text-column", "body",
                          "--format", "jsonl", "--quiet")
    assert code == 0, err
    recs = [json.loads(x) for x in out.splitlines()]
    assert [r["status"] for r in recs] == ["ok", "ok", "ok", "empty"]
    for argv, needle in (([str(table), "--text-column", "text"], "no column 'text'"),
                         ([str(tmp_path / "missing.txt")], "does not exist"),
                         ([str(tmp_path)], "is a directory")):
        code, _, err = _cli(capsys, "predict", *argv, "--model", str(tiny_export))
        assert code == 1 and needle in err and "fix:" in err and "Traceback" not in err, err
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code, _, err = _cli(capsys, "predict", str(empty), "--model", str(tiny_export))
    assert code == 1 and "no texts to label" in err
    code, _, err = _cli(capsys, "predict", str(table), "--text-column", "body", "--model", str(tmp_path))
    assert code == 1 and "not an exported model directory" in err
    code, _, err = _cli(capsys, "predict", str(table))
    assert code == 1 and "--model DIR or --registry DIR" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = _cli(capsys, "predict", str(table), "--text-column", "body", "--model", str(tiny_export),
                        "--out", str(blocker / "labels.csv"), "--quiet")
    assert code == 1 and "cannot write" in err and "Traceback" not in err


@pytest.mark.slow
def test_predict_reads_stdin_in_a_subprocess(tiny_export):
    data = ("\n".join(TEXTS) + "\n\n").encode()
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "predict", "--model", str(tiny_export)], input=data,
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    rows = list(csv.DictReader(io.StringIO(proc.stdout.decode())))
    assert len(rows) == len(TEXTS) + 1 and rows[-1]["status"] == "empty"
    assert b"labelled" in proc.stderr  # progress and summary go to stderr, never into the output


def _labelled_csv(path, texts, labels):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels, strict=True))
    return path


def test_drift_check_compares_with_the_export_figures(clf, tiny_export, tmp_path, capsys):
    from fedtune.common.training.data import read_bbc_news

    bbc = read_bbc_news()
    texts = bbc.texts[::40][:40]
    probs = clf.predict_proba(texts)
    recorded = clf.record["metrics"]["test"]
    # fresh data the model gets right (labels = its own predictions): accuracy 1, no drift
    agree = _labelled_csv(tmp_path / "agree.csv", texts, [clf.labels[i] for i in probs.argmax(-1)])
    code, out, err = _cli(capsys, "drift", "--data", str(agree), "--model", str(tiny_export), "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["verdict"] == "ok" and rep["fresh"]["accuracy"] == 1.0 and rep["n"] == 40
    assert rep["recorded"]["accuracy"] == recorded["accuracy"]
    assert rep["drop"]["accuracy"] == pytest.approx(recorded["accuracy"] - 1.0)
    assert rep["small_sample"] is True
    # fresh data it gets all wrong (labels = its least likely class): accuracy 0, drift, exit 4, local report
    wrong = _labelled_csv(tmp_path / "wrong.csv", texts, [clf.labels[i] for i in probs.argmin(-1)])
    report = tmp_path / "drift.json"
    code, out, err = _cli(capsys, "drift", "--data", str(wrong), "--model", str(tiny_export), "--threshold", "0.1",
                          "--report", str(report))
    assert code == 4, err
    rep = json.loads(report.read_text())
    assert recorded["accuracy"] > 0.1  # five balanced classes: even a one-class model scores about 0.2
    assert rep["drifted"] == [k for k in ("accuracy", "macro_f1") if recorded[k] > 0.1]
    assert f"verdict: DRIFT ({', '.join(rep['drifted'])} dropped by more than 0.1)" in out
    assert rep["fresh"]["accuracy"] == 0.0 and rep["drop"]["accuracy"] == pytest.approx(recorded["accuracy"])
    lo, hi = rep["fresh"]["accuracy_ci95"]
    assert lo == 0.0 and 0.05 < hi < 0.15  # Clopper-Pearson upper bound for 0/40 is 0.088
    # labels the model does not know: one clear message
    bad = _labelled_csv(tmp_path / "bad.csv", texts[:2], ["weather", "sport"])
    code, _, err = _cli(capsys, "drift", "--data", str(bad), "--model", str(tiny_export))
    assert code == 1 and "'weather'" in err and "model's label set" in err and "Traceback" not in err


def test_drift_on_the_servers_test_split_reproduces_the_recorded_figures(clf, tiny_run, tmp_path):
    """The merged model served by fedtune scores the run's own test split as the server's PEFT model did."""
    from fedtune.common.operations.rundir import RunDir
    from fedtune.common.serving.drift import check
    from fedtune.common.training import data
    from fedtune.common.training.config import load_config

    cfg = load_config(RunDir(tiny_run).read_config())
    d = cfg.data
    splits = data.load_splits(path=d.path, text_column=d.text_column, label_column=d.label_column,
                              labels=d.label_list, task=cfg.model.task, val_fraction=d.val_fraction,
                              test_fraction=d.test_fraction, seed=d.seed, max_records=d.max_records)
    report = check(clf, splits.test.texts, splits.test.labels, threshold=0.05)
    n = len(splits.test)
    assert report["n"] == report["recorded"]["n"] == n
    # equal up to a near-tie flipping under float32 rounding (padding differs: batch-longest vs max-length)
    assert abs(report["fresh"]["accuracy"] - report["recorded"]["accuracy"]) <= 1 / n
    assert report["verdict"] == "ok"
