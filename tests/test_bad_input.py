"""Bad input gets one clear message naming the problem and the fix, a non-zero exit, no traceback,
and nothing is lost (no ledger entry, no output written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedtune.cli import main
from helpers import EASY_LABELS, write_easy_csv, write_jsonl

LABELS = "data.labels=" + ",".join(EASY_LABELS)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def _assert_clean_failure(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    assert err.startswith("fedtune: error: "), err
    assert "fix:" in err, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


@pytest.fixture
def run_local(capsys, tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"

    def run(data_path: Path, *settings: str) -> tuple[int, str]:
        code, err = run_cli(capsys, "local", "--data", str(data_path), "--state-dir", str(state), "--out", str(out),
                            "model.max-length=16", "train.local-steps=1", *settings)
        # nothing lost or half-written: no ledger spend, no output directory
        assert not (state / "ledger").exists() or not list((state / "ledger").glob("*.json"))
        assert not out.exists()
        return code, err

    return run


def test_missing_file(run_local, tmp_path):
    _assert_clean_failure(*run_local(tmp_path / "nope.csv", LABELS), "does not exist", "data.path")


def test_missing_column(run_local, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("body,label\nhello,sport\n", encoding="utf-8")
    _assert_clean_failure(*run_local(p, LABELS), "no column 'text'", "body, label", "data.text-column")


def test_misnamed_label_column(run_local, tmp_path):
    p = write_easy_csv(tmp_path / "d.csv")
    _assert_clean_failure(*run_local(p, LABELS, "data.label-column=topic"), "no column 'topic'",
                          "data.label-column")


def test_empty_file(run_local, tmp_path):
    p = tmp_path / "empty.csv"
    p.write_bytes(b"")
    _assert_clean_failure(*run_local(p, LABELS), "is empty")


def test_header_only_file(run_local, tmp_path):
    p = tmp_path / "header.csv"
    p.write_text("text,label\n", encoding="utf-8")
    _assert_clean_failure(*run_local(p, LABELS), "no records")


def test_non_utf8_bytes(run_local, tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\ncaf\u00e9 news,sport\n".encode("latin-1"))
    _assert_clean_failure(*run_local(p, LABELS), "not valid UTF-8", "line 2", "iconv")


def test_label_outside_label_set(run_local, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a goal", "label": "sport"}, {"text": "rates", "label": "weather"}])
    _assert_clean_failure(*run_local(p, LABELS), "'weather'", "not in the job's label set")


def test_no_label_set_lists_the_labels_found(run_local, tmp_path):
    p = write_easy_csv(tmp_path / "d.csv")
    _assert_clean_failure(*run_local(p), "no label set", "data.labels=finance,sport")


def test_fewer_rows_than_one_batch(run_local, tmp_path):
    p = write_easy_csv(tmp_path / "d.csv", n=20)
    _assert_clean_failure(*run_local(p, LABELS, "train.batch-size=32"), "fewer than one batch", "train.batch-size")


def test_malformed_jsonl(run_local, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok", "label": "sport"}\n{"text": broken\n', encoding="utf-8")
    _assert_clean_failure(*run_local(p, LABELS), "line 2 is not valid JSON")


def test_unknown_and_bad_settings_reported_together(run_local, tmp_path):
    p = write_easy_csv(tmp_path / "d.csv")
    code, err = run_local(p, LABELS, "lora.rank=4", "train.lr=fast", "privacy.delta=2")
    _assert_clean_failure(code, err, "3 problems", "lora.rank", "did you mean 'lora.r'", "train.lr", "privacy.delta")


def test_corrupt_adapter_file(capsys, tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage-not-safetensors" * 10)
    code, err = run_cli(capsys, "evaluate", "--adapter", str(d), "--data", str(write_easy_csv(tmp_path / "d.csv")),
                        LABELS)
    _assert_clean_failure(code, err, "corrupt or not a safetensors file", "re-export")


def test_pickled_adapter_is_refused(capsys, tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    code, err = run_cli(capsys, "evaluate", "--adapter", str(d))
    _assert_clean_failure(code, err, "refuses to load")


def test_wrong_adapter_for_model(capsys, tmp_path, fresh_easy):
    """An adapter trained for 2 labels does not silently load into a 5-label model."""
    from fedtune.common.training import adapter

    out = adapter.save_adapter(fresh_easy.model, tmp_path / "two-labels")
    code, err = run_cli(capsys, "evaluate", "--adapter", str(out), "data.max-records=30")
    _assert_clean_failure(code, err, "shape", "label set")


def test_process_exit_code_and_no_traceback(tmp_path):
    """The real process: one message on stderr, exit code 1."""
    p = tmp_path / "latin.csv"
    p.write_bytes(b"text,label\n\xff\xfe,sport\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "local", "--data", str(p), "--state-dir",
                           str(tmp_path / "s"), LABELS], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("fedtune: error:") == 1 and "not valid UTF-8" in proc.stderr


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`fedtune config | head -1`: a closed pipe is the reader's choice, not an error with a traceback."""
    p = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "config"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


# -- input that used to be read wrongly without a word ------------------------------------------------
def _read(path, **kw):
    from fedtune.common.training import data

    return data.read_records(path, text_column="text", label_column="label", labels=EASY_LABELS, **kw)


@pytest.mark.parametrize("sep", ["\u2028", "\u0085", "\u2029", "\x0b", "\x1c"])
def test_jsonl_texts_holding_unicode_line_separators_are_read_whole(tmp_path, sep):
    """JSON Lines are separated by \\n only; str.splitlines() also split at these, inside a text (invalid JSON)."""
    text = f"the market fell{sep}then rose"
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": text, "label": "finance"}, {"text": "a goal", "label": "sport"}])
    assert _read(p).texts == [text, "a goal"]


def test_a_csv_row_with_more_fields_than_the_header_is_refused_not_cut(run_local, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nthe striker scored,sport\nthe market fell, then rose,finance\n", encoding="utf-8")
    _assert_clean_failure(*run_local(p, LABELS), f"{p} line 3: 3 fields, but the header has 2", "quote fields")


def test_a_duplicated_csv_header_is_refused(run_local, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label,text\nthe striker scored,sport,old copy\n", encoding="utf-8")
    _assert_clean_failure(*run_local(p, LABELS), "names column 'text' more than once", "own name")


@pytest.mark.parametrize("value,kind", [(3.5, "a number"), (["x"], "a list"), (float("nan"), "a number"),
                                        ({"a": 1}, "an object"), (True, "a bool")])
def test_json_values_that_are_not_texts_are_refused(run_local, tmp_path, value, kind):
    import json

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a goal", "label": "sport"}) + "\n" + json.dumps({"text": value,
                 "label": "finance"}) + "\n", encoding="utf-8")
    _assert_clean_failure(*run_local(p, LABELS), f"{p}: record 2: 'text' is {kind}", "JSON string")


def test_whole_number_labels_are_texts_but_fractional_ones_are_refused(tmp_path):
    from fedtune.common.errors import DataError
    from fedtune.common.training import data

    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    assert data.read_records(p, text_column="text", label_column="label", labels=["0", "1"]).labels == ["1", "0"]
    q = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": 1.5}])
    with pytest.raises(DataError, match="'label' is a number"):
        data.read_records(q, text_column="text", label_column="label", labels=["1.5"])
