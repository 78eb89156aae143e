"""From a validated job config to components: the one place the model and the records are built.

Every caller (the server's held-out model, a deployed or simulated node, export, the local
recipe, the baselines) goes through these functions, so a new model or data setting is read
here and nowhere else. Below this layer, functions take the few values they need.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def tokenized(cfg: JobConfig, lora: LoraModel, splits: data.Splits, *names: str) -> list:
    """The named splits tokenized for the job's model (``max_length`` from the config)."""
    return [data.tokenize(getattr(splits, n), lora.tokenizer, label_set=splits.labels,
                          max_length=cfg.model.max_length) for n in names]
