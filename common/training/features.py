"""Features once: a recipe whose encoder is frozen trains and evaluates its head on precomputed features.

With ``lora.head-only`` only the classification head is trained; everything below it (the encoder, its
pooling, LoRA at its initial value, dropout off) is the same function every round. So the head's input for
each record is computed once per job (:func:`extract`) and the head alone (:class:`FeatureHead`) is trained
and evaluated on it. The DP mechanism is unchanged: the same Poisson batches of the same records, the same
per-sample clipping of the head's gradients (which depend only on the head's input), the same noise and
ledger entries; ``tests/test_features.py`` shows cached and uncached training give the same head.

A features dataset keeps the tokens' layout, ``(features, a column of ones, labels)``, so every function that
calls ``model(input_ids=batch[0], attention_mask=batch[1])`` (training, evaluation, noised answers, the
fairness audit) runs on it with a :class:`FeatureHead` unchanged. Features are derived from private records:
they are never sent, and never written to a run directory. They live in the process's memory and, for the
node's next process, in the node's own cache directory: a deployed node's state directory (``cache/``), a
simulation's private temporary directory (deleted with it), or a ``fedtune tune`` study's node state.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)

_CACHE: OrderedDict[str, dict[bytes, torch.Tensor]] = OrderedDict()  # model digest -> record hash -> features
_MODEL_DIGESTS: dict[str, str] = {}
MAX_MODELS = 4
MAX_RECORDS = 500_000  # per model: about 770 MB of 384-dim features


class FeatureHead(torch.nn.Module):
    """The trained head alone: ``forward(input_ids=features)`` gives the logits the whole model gives."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        w = next(self.head.parameters())
        return SequenceClassifierOutput(logits=self.head(input_ids.to(device=w.device, dtype=w.dtype)))


def head_wrapper(model: torch.nn.Module) -> torch.nn.Module | None:
    """The PEFT wrapper of the one trained module of a head-only classifier (its input is the feature), or None
    when the trained weights are anywhere else (LoRA recipes: the encoder changes, features cannot be cached)."""
    from peft.utils.other import ModulesToSaveWrapper

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    if len(wrappers) != 1 or not trained:
        return None
    name, wrapper = wrappers[0]
    return wrapper if all(t.startswith(name + ".") for t in trained) else None


def feature_head(model: torch.nn.Module) -> FeatureHead | None:
    """The head to train on features (the same parameters the PEFT model holds), or None (see :func:`head_wrapper`)."""
    wrapper = head_wrapper(model)
    if wrapper is None:
        return None
    return FeatureHead(wrapper.modules_to_save[wrapper.active_adapters[0]])


def _model_digest(model: torch.nn.Module, base_path: Path) -> str:
    """What the frozen part computes: the base model's files, and the (frozen) weights as loaded."""
    key = str(base_path)
    if key not in _MODEL_DIGESTS:
        h = hashlib.sha256()
        for f in sorted(Path(base_path).rglob("*")):
            if f.is_file():
                h.update(f.relative_to(base_path).as_posix().encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(chunk)
        _MODEL_DIGESTS[key] = h.hexdigest()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad and "lora_" in n}  # LoRA as initialised
    h = hashlib.sha256(_MODEL_DIGESTS[key].encode())
    for n in sorted(frozen):
        h.update(n.encode() + frozen[n].detach().cpu().float().numpy().tobytes())
    cfg = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
    h.update(repr(sorted((cfg.to_dict() if cfg is not None else {}).items())).encode())  # pooling, labels
    first = next(model.parameters())
    h.update(f"{first.dtype}|{first.device}".encode())
    return h.hexdigest()


def extract(model: torch.nn.Module, dataset: TensorDataset, *, base_path: Path, batch_size: int,
            cache_dir: str | Path | None = None) -> TensorDataset:
    """``(features, ones, labels)`` of a tokenized classification dataset: the head's input for each record, in
    order. Each record's features are computed once per process and model (kept in memory by a hash of its
    tokens), so a subset of records already seen (a node's partition, a baseline) costs nothing more.

    ``cache_dir``: also keep them there, for the node's next process (a deployed node's own state directory:
    Flower runs each message in a fresh process; a simulation's private temporary directory, shared by its
    Ray workers and deleted with it). Never a run directory: features are derived from private records."""
    wrapper = head_wrapper(model)
    if wrapper is None:
        raise ValueError("features apply to a head-only classifier")
    digest = _model_digest(model, base_path)
    cache = _CACHE.setdefault(digest, {})
    _CACHE.move_to_end(digest)
    while len(_CACHE) > MAX_MODELS:
        _CACHE.popitem(last=False)
    ids, mask = dataset.tensors[0], dataset.tensors[1]
    keys = [hashlib.sha256(ids[i].numpy().tobytes() + mask[i].numpy().tobytes()).digest() for i in range(len(ids))]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values())
    head = wrapper.modules_to_save[wrapper.active_adapters[0]]
    stored = None
    if cache_dir is not None and keys:
        stored = Path(cache_dir) / ("features-" + hashlib.sha256(digest.encode() + b"".join(keys)).hexdigest()[:32]
                                    + ".safetensors")
        if missing and stored.is_file():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                x = load_file(str(stored))["features"]
                if len(x) == len(keys):
                    for k, f in zip(keys, x, strict=True):
                        cache[k] = f.clone()
                    missing = []
            except (SafetensorError, OSError, KeyError):
                pass  # a damaged cache file is computed again
    if missing:
        grabbed: list[torch.Tensor] = []

        def grab(_module, args, _output):
            grabbed.append(args[0].detach().float().cpu())

        hook = wrapper.register_forward_hook(grab)
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        try:
            with torch.no_grad():
                for start in range(0, len(missing), batch_size):
                    rows = missing[start:start + batch_size]
                    model(input_ids=ids[rows].to(dev), attention_mask=mask[rows].to(dev))
        finally:
            hook.remove()
            model.train(was_training)
        for i, f in zip(missing, torch.cat(grabbed), strict=True):
            cache[keys[i]] = f.clone()
        if len(cache) > MAX_RECORDS:  # (a bound on memory; what is dropped is computed again when needed)
            for k in list(cache)[: len(cache) - MAX_RECORDS]:
                del cache[k]
    x = torch.stack([cache[k] for k in keys]) if keys else torch.zeros((0, head.in_features))
    if stored is not None and not stored.is_file():
        from fedtune.common.operations.atomic import write_atomic
        from safetensors.torch import save

        write_atomic(stored, save({"features": x.contiguous()}))
    return TensorDataset(x, torch.ones((len(x), 1), dtype=torch.long), *dataset.tensors[2:])
