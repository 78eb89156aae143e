"""Label texts with an exported model: a small Python API for services, and the file handling of
``fedtune predict``.

    from fedtune.common.serving.inference import Classifier
    clf = Classifier.from_registry("registry")          # the current version, verified
    clf = Classifier("exports/v3")                      # or any exported (or plain HF) directory
    clf.predict(["Shares fell sharply ...", "The striker scored ..."])
    # [Prediction(label='business', score=0.91, probabilities={...}, status='ok'), ...]

Only ``transformers`` and ``torch`` are needed at serving time: the export is a merged model.
Blank texts get no label (status ``empty``) instead of a guess.

Input files for ``fedtune predict`` (documented in docs/serving.md):
- ``.csv``, ``.jsonl``, ``.parquet``: one record per row, the text in ``--text-column`` (strict UTF-8);
- anything else, or ``-`` for stdin: one text per line. Output rows keep the input's line numbers, so
  every input line gets exactly one output row. Blank lines -> status ``empty``. A line that is not
  valid UTF-8 -> by default the command stops before labelling anything and names the line
  (``--on-bad-bytes error``); ``replace`` labels it with U+FFFD in place of the bad bytes (status
  ``replaced-bytes``); ``skip`` leaves it unlabelled (status ``invalid-utf8``).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fedtune.common.errors import DataError, ModelError
from fedtune.common.operations.atomic import write_atomic

ON_BAD_BYTES = ("error", "replace", "skip")
FORMATS = ("csv", "jsonl")


@dataclass(frozen=True)
class Prediction:
    """One text's result: the most likely label, its probability, and every label's probability."""

    label: str | None
    score: float | None
    probabilities: dict[str, float]
    status: str = "ok"


def load_classifier(d: Path) -> torch.nn.Module:
    """A merged classifier from an export directory, without running any code from it.

    A mean-pooled export (``model.pooling=mean``) names fedtune's pooling code for stock transformers
    (trust_remote_code); here its base architecture is loaded from transformers itself and the pooling
    applied from the installed fedtune instead.
    """
    import transformers
    from fedtune.common.training.pooling import MARK, attach_mean_pooling

    conf = json.loads((d / "config.json").read_text(encoding="utf-8"))
    if conf.get(MARK, "cls") == "cls":
        return transformers.AutoModelForSequenceClassification.from_pretrained(str(d), local_files_only=True,
                                                                               dtype=torch.float32)
    arch = getattr(transformers, str(conf.get("fedtune_base_architecture")), None)
    config_cls = getattr(transformers, str(conf.get("fedtune_base_config")), None)
    if conf.get(MARK) != "mean" or arch is None or config_cls is None or \
            not arch.__name__.endswith("ForSequenceClassification"):
        raise ValueError(f"config.json names a pooling ({conf.get(MARK)!r}) or base architecture this fedtune "
                         "does not know")
    config = config_cls.from_pretrained(str(d), local_files_only=True)
    model = arch.from_pretrained(str(d), config=config, local_files_only=True, dtype=torch.float32)
    attach_mean_pooling(model)
    return model


class Classifier:
    """A text classifier loaded from an exported directory (stock transformers, no PEFT).

    Args:
        directory: an export (``fedtune export`` / a registry version) or any Hugging Face
            sequence-classification directory with ``id2label`` in its config.
        batch_size: texts per forward pass.
        max_length: tokens kept per text; default the length the model was trained with.
        verify: check the files against the sha256 recorded at export (when the directory has a record).
    """

    def __init__(self, directory: str | Path, *, batch_size: int = 32, max_length: int | None = None,
                 verify: bool = True, device: str = "auto") -> None:
        from fedtune.common.serving import export
        from fedtune.common.training.model import resolve_device
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        d, self.record = export.open_export(directory, task="seq-cls", verify_files=verify)
        self.directory = d
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            # never code from the directory (and never a prompt asking whether to run it)
            self.tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
            self.model = load_classifier(d)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a classifier from {d}: {e}",
                             "re-export the run; the directory is damaged or not a classifier") from None
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        id2label = self.model.config.id2label or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(self.model.num_labels)]
        trained = (self.record or {}).get("model", {}).get("max_length")
        self.max_length = int(max_length or trained or min(getattr(self.tokenizer, "model_max_length", 512), 512))
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 32")

    @classmethod
    def from_registry(cls, registry: str | Path, version: str | None = None, **kw) -> Classifier:
        """The registry's current version (or ``version``), after checking its files' hashes."""
        from fedtune.common.serving.registry import Registry

        return cls(Registry(registry).resolve(version), verify=False, **kw)

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str],
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Class probabilities, shape (len(texts), len(labels)); texts are truncated to ``max_length`` tokens."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start:start + self.batch_size])
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            logits = self.model(**enc.to(self.device)).logits
            out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
            if progress:
                progress(min(start + self.batch_size, len(texts)), len(texts))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict(self, texts: Sequence[str],
                progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
        """A :class:`Prediction` per text; blank texts get ``label=None`` and status ``empty``."""
        keep = [i for i, t in enumerate(texts) if t is not None and str(t).strip()]
        probs = self.predict_proba([str(texts[i]) for i in keep], progress)
        out: list[Prediction] = [Prediction(None, None, {}, "empty")] * len(texts)
        for row, i in zip(probs, keep, strict=True):
            j = int(row.argmax())
            out[i] = Prediction(self.labels[j], float(row[j]),
                                {lab: float(p) for lab, p in zip(self.labels, row, strict=True)})
        return out

    __call__ = predict


# -- `fedtune predict`: reading inputs, writing results -------------------------------------------------------------

@dataclass(frozen=True)
class InputText:
    line: int  # line (text input) or record (CSV/JSONL/Parquet) number, from 1
    text: str | None  # None: nothing to label (see status)
    status: str  # ok | empty | replaced-bytes | invalid-utf8


def read_inputs(source: str, *, text_column: str = "text", on_bad_bytes: str = "error") -> list[InputText]:
    """The texts to label from a file (or ``-`` for stdin), one entry per input line or record.

    Raises:
        DataError: missing/empty input, a missing text column, or (with ``on_bad_bytes="error"``) a line
            that is not UTF-8 -- before anything is labelled.
    """
    if on_bad_bytes not in ON_BAD_BYTES:
        raise DataError(f"--on-bad-bytes must be one of {', '.join(ON_BAD_BYTES)}, got {on_bad_bytes!r}",
                        "use error (stop), replace or skip")
    if source != "-":
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"input file {path} does not exist" if not path.exists() else f"{path} is a directory",
                            "give a text file (one text per line), a .csv/.jsonl/.parquet file, or - for stdin")
        if path.suffix.lower() in (".csv", ".jsonl", ".parquet", ".pq"):
            return _read_table(path, text_column)
        raw, name = path.read_bytes(), str(path)
    else:
        raw, name = sys.stdin.buffer.read(), "stdin"
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise DataError(f"{name} is empty: there are no texts to label", "give one text per line")
    out = []
    for n, b in enumerate(lines, start=1):
        b = b[:-1] if b.endswith(b"\r") else b
        try:
            text, status = b.decode("utf-8"), "ok"
        except UnicodeDecodeError as e:
            if on_bad_bytes == "error":
                raise DataError(f"{name} line {n} is not valid UTF-8 (byte 0x{b[e.start]:02x} at column {e.start + 1})",
                                "re-save the input as UTF-8 (e.g. iconv -f latin1 -t utf-8), or pass "
                                "--on-bad-bytes replace (label it with the bad bytes replaced) or skip "
                                "(leave that line unlabelled)") from None
            if on_bad_bytes == "skip":
                out.append(InputText(n, None, "invalid-utf8"))
                continue
            text, status = b.decode("utf-8", errors="replace"), "replaced-bytes"
        out.append(InputText(n, text, status) if text.strip() else InputText(n, None, "empty"))
    return out


def _read_table(path: Path, text_column: str) -> list[InputText]:
    from fedtune.common.training.data import _read_rows

    rows, columns = _read_rows(path)
    if not rows:
        raise DataError(f"{path} has no records", "give a file with at least one record")
    if text_column not in columns:
        raise DataError(f"{path} has no column {text_column!r}; its columns are: {', '.join(map(str, columns))}",
                        "pass --text-column <one of those columns>")
    out = []
    for n, row in enumerate(rows, start=1):
        t = row.get(text_column)
        t = None if t is None else str(t)
        out.append(InputText(n, t, "ok") if t and t.strip() else InputText(n, None, "empty"))
    return out


def label_inputs(clf: Classifier, inputs: list[InputText],
                 progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """A prediction per input (unlabelled entries keep their status)."""
    preds = clf.predict([i.text or "" for i in inputs], progress)
    return [Prediction(None, None, {}, i.status) if i.text is None or p.label is None
            else Prediction(p.label, p.score, p.probabilities, i.status) for p, i in zip(preds, inputs, strict=True)]


def format_predictions(inputs: list[InputText], preds: list[Prediction], labels: list[str], *, fmt: str,
                       include_text: bool = False) -> str:
    """CSV (``line,status,label,score,p_<label>...[,text]``) or JSON Lines, one row per input."""
    if fmt not in FORMATS:
        raise DataError(f"unknown output format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    buf = io.StringIO()
    if fmt == "csv":
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["line", "status", "label", "score", *[f"p_{lab}" for lab in labels]] + (["text"] * include_text))
        for i, p in zip(inputs, preds, strict=True):
            probs = [f"{p.probabilities[lab]:.6f}" for lab in labels] if p.label is not None else [""] * len(labels)
            w.writerow([i.line, p.status, p.label or "", "" if p.score is None else f"{p.score:.6f}", *probs]
                       + ([i.text or ""] if include_text else []))
    else:
        for i, p in zip(inputs, preds, strict=True):
            row = {"line": i.line, "status": p.status, "label": p.label, "score": p.score,
                   "probabilities": p.probabilities or None}
            if include_text:
                row["text"] = i.text
            buf.write(json.dumps(row, ensure_ascii=False) + "\n")
    return buf.getvalue()


def write_output(content: str, out: str | None) -> None:
    """To stdout, or to ``out`` atomically (a temporary file renamed into place: complete or absent)."""
    if not out or out == "-":
        sys.stdout.write(content)
        sys.stdout.flush()
        return
    path = Path(out).expanduser()
    try:
        write_atomic(path, content)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}",
                        "choose an output path you can write to (or leave out --out for stdout)") from None

