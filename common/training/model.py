"""The pretrained model, its tokenizer, and the LoRA (or FFA-LoRA) adapter around it.

Models load only from local directories (``local_files_only``); the packaged
all-MiniLM-L6-v2 is the default. The initial adapter is a pure function of
``lora.seed``, so every node builds the same A matrices and head.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from fedtune.common.errors import ModelError
from fedtune.common.training.assets import SMOLLM2, default_model_dir, gguf_model_dir, smollm2_gguf

log = logging.getLogger(__name__)


@dataclass
class LoraModel:
    """A PEFT model ready to train, with what is needed to feed and exchange it."""

    model: torch.nn.Module  # peft.PeftModel
    tokenizer: object
    task: str
    labels: list[str]
    ffa: bool
    base_path: Path
    head_only: bool = False

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_model_path(path: str) -> Path:
    """The directory to load: ``path`` if given, else the packaged default.

    ``path`` may also name the packaged SmolLM2-135M-Instruct (``smollm2-135m-instruct``) or a ``.gguf`` file;
    both are converted once to an fp32 transformers directory in fedtune's cache.
    """
    if not path:
        return default_model_dir()
    if path == SMOLLM2:
        return gguf_model_dir(smollm2_gguf())
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p} does not exist", "check model.path")
        return gguf_model_dir(p)
    if not p.is_dir():
        raise ModelError(f"model directory {p} does not exist",
                         "set model.path to a local directory holding config.json and weights "
                         "(models are never downloaded)")
    if not (p / "config.json").is_file():
        raise ModelError(f"{p} has no config.json, so it is not a transformers model directory",
                         "point model.path at the directory written by save_pretrained()")
    return p


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {path}: {e}",
                         "save the tokenizer next to the model (tokenizer.save_pretrained(dir))") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(path: Path, *, task: str, labels: Sequence[str]) -> torch.nn.Module:
    """The pretrained model with a fresh classification head for ``labels`` (seq-cls) or as a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized head" is expected here
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if task == "seq-cls":
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(path), num_labels=len(labels), local_files_only=True, dtype=torch.float32,
                    id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a {task} model from {path}: {e}",
                         "check model.path and model.task (seq-cls needs an encoder or decoder with a "
                         "sequence-classification head class; causal-lm a decoder)") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def build_lora_model(*, model_path: str, task: str, labels: Sequence[str], r: int, alpha: float, dropout: float,
                     target_modules: list[str] | None, ffa: bool, seed: int, head_only: bool = False,
                     device: str = "cpu", precision: str = "fp32", pooling: str = "cls") -> LoraModel:
    """Load the base model and wrap it with a LoRA adapter initialised from ``seed``.

    With ``ffa`` (FFA-LoRA, Sun et al. 2024) the A matrices stay frozen at their
    seeded initial values and only B (and the head) are trained and exchanged. With
    ``head_only`` all of LoRA stays at its initial value (B = 0: the adapter adds nothing) and only
    the classification head is trained and exchanged: a linear probe on the frozen model's features.
    ``precision`` (see :func:`resolve_dtype`) is the dtype of the frozen base weights only: what is trained
    (LoRA, a head) stays fp32, so per-sample gradients, clipping and noise are computed in fp32.
    ``pooling="mean"`` makes the classification head read mean-pooled features (:func:`use_mean_pooling`).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    path = resolve_model_path(model_path)
    dev = resolve_device(device)  # before loading anything: a wrong device fails in a second, not after a minute
    tokenizer = load_tokenizer(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head and A matrices: identical on every node
        base = load_base_model(path, task=task, labels=labels).to(dev)  # before PEFT wraps it (Opacus issue 820)
        if pooling == "mean":
            use_mean_pooling(base)
        dtype = resolve_dtype(precision, dev)
        if dtype != torch.float32:
            base = base.to(dtype)  # the frozen weights; PEFT makes the LoRA weights fp32 (autocast_adapter_dtype)
        cfg = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
            task_type=TaskType.SEQ_CLS if task == "seq-cls" else TaskType.CAUSAL_LM,
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = get_peft_model(base, cfg)
        except ValueError as e:
            raise ModelError(f"cannot put LoRA on {path}: {e}",
                             "set lora.target-modules to linear layers of this model (e.g. query,value)") from None
    if ffa or head_only:
        for name, p in model.named_parameters():
            if "lora_A" in name or (head_only and "lora_" in name):
                p.requires_grad_(False)
    if dtype != torch.float32:
        _trainable_in_fp32(model)
    # PEFT leaves new modules in train mode but the copied head in eval mode; Opacus
    # then records no activations for the head. Keep one mode for the whole model.
    model.eval()
    return LoraModel(model=model, tokenizer=tokenizer, task=task, labels=list(labels), ffa=ffa, base_path=path,
                     head_only=head_only)


def mean_pooling_applies(model_path: str) -> bool:
    """Whether ``model.pooling=mean`` can work for this model: a BERT classifier, whose head reads the pooler
    (RoBERTa-style classifiers have their own head over the first token and no pooler to replace)."""
    import json

    try:
        path = resolve_model_path(model_path)
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") == "bert"
    except (ModelError, OSError, ValueError):
        return False


def use_mean_pooling(model: torch.nn.Module) -> None:
    """Make a sequence classifier's head read mean-pooled features (``model.pooling=mean``), in place.

    Raises:
        ModelError: the model has no BERT-style pooler to replace.
    """
    from fedtune.common.training.pooling import attach_mean_pooling

    try:
        attach_mean_pooling(model)
    except ValueError as e:
        raise ModelError(f"model.pooling=mean: {e}", "set model.pooling=cls for this model") from None


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base weights for ``train.precision`` on ``device``.

    auto: bf16 on a CUDA GPU that supports it (half the memory and faster matmuls; the frozen weights need no
    fp32 master copy), fp32 elsewhere (bf16 on most CPUs is slower, not faster). bf16 can be forced anywhere.
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision in ("auto", "") and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _trainable_in_fp32(model: torch.nn.Module) -> None:
    """Keep every trained weight in fp32 on a low-precision base.

    PEFT already upcasts LoRA weights and casts their inputs. A trained module it copies (a classification
    head, ``modules_to_save``) keeps the base's dtype: it is cast to fp32 here, and its inputs are cast on the
    way in, so Opacus records fp32 activations and computes fp32 per-sample gradients for it.
    """
    def cast(t):
        return t.float() if torch.is_tensor(t) and t.is_floating_point() else t

    def to_fp32(_module, args, kwargs):
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and any(p.dtype != torch.float32 for p in own):
            module.float()
            module.register_forward_pre_hook(to_fp32, with_kwargs=True)


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device for ``train.device`` (auto: the first CUDA GPU when torch sees one, else the CPU).

    Raises:
        ModelError: a CUDA device was asked for on a machine (or torch build) without one.
    """
    if spec in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support (" + torch.__version__ + ")" if torch.version.cuda is None
               else "torch sees no CUDA GPU (no device, or no driver)")
        raise ModelError(f"train.device={spec} but {why}",
                         "set train.device=cpu (or auto, which falls back to the CPU), or run on a machine with an "
                         "NVIDIA GPU and a CUDA build of torch")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        raise ModelError(f"train.device={spec} but this machine has {torch.cuda.device_count()} CUDA device(s)",
                         f"use cuda:0..cuda:{torch.cuda.device_count() - 1}, or cuda for the first")
    return torch.device("cuda", index)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
