"""From a validated job config to components: the one place the model and the records are built.

Every caller (the server's held-out model, a deployed or simulated node, export, the local
recipe, the baselines) goes through these functions, so a new model or data setting is read
here and nowhere else. Below this layer, functions take the few values they need.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from fedtune.common.training import data
from fedtune.common.training.config import JobConfig
from fedtune.common.training.model import LoraModel, build_lora_model


def build_model(cfg: JobConfig, labels: Sequence[str], *, task: str | None = None) -> LoraModel:
    """The job's base model wrapped with its seeded LoRA adapter (``task`` overrides ``model.task``)."""
    lc = cfg.lora
    return build_lora_model(model_path=cfg.model.path, task=task or cfg.model.task, labels=list(labels), r=lc.r,
                            alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_module_list, ffa=lc.ffa,
                            head_only=lc.head_only, seed=lc.seed, device=cfg.train.device,
                            precision=cfg.train.precision, pooling=cfg.model.pooling)


def load_records(cfg: JobConfig, path: str | None = None, *, own_source: bool = False) -> data.Splits:
    """The job's records split into train / val / test (``path`` overrides ``data.path``: a node's own file).

    ``own_source``: these are a node's private records (see :func:`data.load_splits`)."""
    d = cfg.data
    return data.load_splits(path=d.path if path is None else str(path), text_column=d.text_column,
                            label_column=d.label_column, labels=d.label_list, task=cfg.model.task,
                            response_column=d.response_column, messages_column=d.messages_column,
                            val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed,
                            max_records=d.max_records, subsample=d.subsample, group_column=d.group_column,
                            own_source=own_source)


def tokenized(cfg: JobConfig, lora: LoraModel, splits: data.Splits, *names: str,
              cache_dir: str | Path | None = None) -> list:
    """The named splits tokenized for the job's model (``max_length`` from the config): the one place text is
    tokenized. ``cache_dir``: keep the tokens there (a node's own cache directory), so a fresh process per message
    (Flower's subprocess isolation) does not redo it; keyed by the records' fingerprint and what tokenizing reads."""
    key = _cache_key(splits.fingerprint, cfg.data.__dict__, str(lora.base_path), cfg.model.max_length,
                     cfg.model.task, splits.labels, names, [len(getattr(splits, n)) for n in names])
    sets = _cached_tokens(cache_dir, key, names) if cache_dir else None
    if sets is None:
        sets = [data.tokenize(getattr(splits, n), lora.tokenizer, label_set=splits.labels,
                              max_length=cfg.model.max_length) for n in names]
        if cache_dir:
            _store_tokens(cache_dir, key, names, sets)
    return sets


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cached_tokens(cache_dir, key: str, names: Sequence[str]) -> list | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.utils.data import TensorDataset

    path = Path(cache_dir) / f"tokens-{key}.safetensors"
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError):
        return None  # a damaged cache is rebuilt
    out = []
    for n in names:
        columns = [t.get(f"{n}/{i}") for i in range(sum(1 for k in t if k.startswith(n + "/")))]
        if not columns or any(c is None for c in columns):
            return None
        out.append(TensorDataset(*columns))
    return out


def _store_tokens(cache_dir, key: str, names: Sequence[str], sets: list) -> None:
    from fedtune.common.operations.atomic import write_atomic
    from safetensors.torch import save

    tensors = {f"{n}/{i}": t.contiguous() for n, ds in zip(names, sets, strict=True) for i, t in enumerate(ds.tensors)}
    write_atomic(Path(cache_dir) / f"tokens-{key}.safetensors", save(tensors))
