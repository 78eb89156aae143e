"""The adapter wire format: trainable adapter state <-> named float32 arrays.

This is the one place that knows how adapter tensors are named. ``pack`` and
``unpack`` work on a PEFT model whether or not Opacus wraps it (its
``_module.`` prefix is stripped here and nowhere else). On disk adapters are
standard PEFT directories (``adapter_config.json`` + safetensors) that stock
``PeftModel.from_pretrained(base, dir)`` loads; nothing is ever pickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from fedtune.common.errors import AdapterError

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model inside an Opacus GradSampleModule (or the model itself)."""
    while hasattr(model, "_module") and isinstance(model._module, torch.nn.Module):
        model = model._module
    return model


def exchanged(key: str, *, ffa: bool, head_only: bool = False) -> bool:
    """Whether an adapter tensor travels between nodes and server.

    FFA-LoRA keeps A local (equal on every node); head-only training keeps all of LoRA at its
    initial value and exchanges only the classification head.
    """
    if head_only:
        return "lora_" not in key
    return not (ffa and "lora_A" in key)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full adapter state dict (LoRA A/B and the head), PEFT's naming."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unwrap(model))


def pack(model: torch.nn.Module, *, ffa: bool, head_only: bool = False) -> dict[str, np.ndarray]:
    """The exchanged adapter tensors as float32 numpy arrays, in a stable key order."""
    state = adapter_state(model)
    return {k: state[k].detach().cpu().to(torch.float32).numpy().copy() for k in sorted(state)
            if exchanged(k, ffa=ffa, head_only=head_only)}


def unpack(model: torch.nn.Module, arrays: Mapping[str, np.ndarray], *, ffa: bool, head_only: bool = False) -> None:
    """Load exchanged arrays into the model, refusing any key or shape that does not fit.

    Raises:
        AdapterError: missing, unexpected or mis-shaped tensors, or non-finite values.
    """
    from peft import set_peft_model_state_dict

    peft_model = unwrap(model)
    state = adapter_state(peft_model)
    expected = {k: tuple(v.shape) for k, v in state.items() if exchanged(k, ffa=ffa, head_only=head_only)}
    check_arrays(arrays, expected)
    tensors = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:  # cannot happen after check_arrays unless PEFT renames keys: fail loudly
        raise AdapterError(f"PEFT did not accept adapter keys: {unexpected[:3]}",
                           "report this: the adapter naming of this PEFT version differs")


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple]) -> None:
    """Raise AdapterError unless ``arrays`` has exactly the expected keys, shapes and finite values."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise AdapterError(
            f"adapter does not fit this model: {'; '.join(parts)}",
            "use an adapter made for the same base model and LoRA settings (lora.r, lora.target-modules, "
            "lora.ffa, lora.head-only, data.labels)",
        )
    for k, shape in expected.items():
        got = tuple(np.shape(arrays[k]))
        if got != tuple(shape):
            raise AdapterError(f"adapter tensor {k} has shape {got}, the model expects {tuple(shape)}",
                               "use an adapter made with the same lora.r and label set")
        if not np.all(np.isfinite(arrays[k])):
            raise AdapterError(f"adapter tensor {k} holds NaN or infinite values",
                               "discard this adapter; it was corrupted or training diverged")


def save_adapter(model: torch.nn.Module, directory: str | Path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a standard PEFT adapter directory (safetensors), plus optional fedtune metadata."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(str(directory), safe_serialization=True)
    if metadata:
        (directory / "fedtune.json").write_text(json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n")
    return directory


def read_adapter_file(directory: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a PEFT adapter directory as numpy arrays (checked, never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    path = directory / ADAPTER_FILE
    if not path.is_file():
        hint = " (it holds a pickled .bin adapter, which fedtune refuses to load)" if (
            directory / "adapter_model.bin").exists() else ""
        raise AdapterError(f"no {ADAPTER_FILE} in {directory}{hint}",
                           "point at a directory written by fedtune or PEFT save_pretrained(safe_serialization=True)")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is corrupt or not a safetensors file ({e})",
                           "re-export the adapter, or delete the file and train again") from None


def load_adapter_dir(model: torch.nn.Module, directory: str | Path) -> None:
    """Load a saved adapter directory into ``model`` (all adapter tensors, A included)."""
    arrays = read_adapter_file(directory)
    unpack(model, arrays, ffa=False)

