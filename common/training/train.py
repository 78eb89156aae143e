"""The local training loop: the same code with DP on or off.

DP wraps the loop (see :mod:`common.privacy`), it does not change it: the loop
computes a per-sample-mean loss, steps the optimizer, and reports progress.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]  # (step, total, running loss)


@dataclass(frozen=True)
class TrainStats:
    steps: int
    mean_loss: float  # over the records' finite losses (the node's own log: never sent)
    seconds: float
    examples: int  # records seen (sampled) over all steps
    dropped: int = 0  # per-record contributions set to zero because their loss or gradient was not finite


def batch_loss(model: torch.nn.Module, batch: list[torch.Tensor], *, task: str,
               reduction: str = "mean", class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of a batch, one value per sample reduced by ``reduction`` ("mean", "sum", "none").

    For causal LM each sequence's token losses are averaged first, so each
    sample contributes one term (what per-sample clipping assumes).
    """
    input_ids, attention_mask = batch[0], batch[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    if task == "seq-cls":
        per_sample = F.cross_entropy(out.logits.float(), batch[2], reduction="none")
        if class_weights is not None:  # fixed weights scale each record's loss; clipping still bounds it
            per_sample = per_sample * class_weights[batch[2]]
    else:
        logits = out.logits[:, :-1, :].float()  # a bf16 base gives bf16 logits: the loss in fp32
        targets = input_ids[:, 1:]
        # instruction records carry a loss mask (response tokens only); plain text trains on every real token
        mask = (batch[2] if len(batch) > 2 else attention_mask)[:, 1:].to(logits.dtype)
        tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
        tok = tok.view(targets.shape) * mask
        per_sample = tok.sum(1) / mask.sum(1).clamp(min=1.0)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def make_optimizer(model: torch.nn.Module, *, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def drop_nonfinite(optimizer: torch.optim.Optimizer, finite_loss: torch.Tensor) -> int:
    """Zero every record's per-sample gradient whose loss or gradient is not finite, before Opacus clips.

    Clipping bounds a record's contribution only when its gradient is finite: a NaN or infinite per-sample
    gradient would turn its clipping factor, and then the whole summed gradient, into NaN (a membership
    signal a crafted model can switch on for one record). A record that contributes zero is within the
    clipping bound, so the DP guarantee is unchanged. Returns how many records were dropped (for the
    node's own log; never reported per record).
    """
    samples = [p.grad_sample for p in optimizer.params  # type: ignore[attr-defined]
               if getattr(p, "grad_sample", None) is not None]
    if any(not isinstance(g, torch.Tensor) for g in samples):  # accumulated over batches: not how fedtune trains
        raise RuntimeError("per-sample gradients accumulated over several batches; fedtune steps once per batch")
    bad = ~finite_loss.to(torch.bool)
    for gs in samples:
        bad = bad.to(gs.device) | ~torch.isfinite(gs.reshape(gs.shape[0], -1)).all(dim=1)
    n = int(bad.sum())
    if n:
        for gs in samples:
            gs[bad.to(gs.device)] = 0.0
    return n


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch still takes a (noise-only) DP step, as the accounting assumes."""
    optimizer.zero_grad(set_to_none=True)  # the last step's summed gradient must not be noised and applied again
    for p in optimizer.params:  # type: ignore[attr-defined]  (a DPOptimizer)
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_steps(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *, steps: int,
                task: str, progress: ProgressFn | None = None, class_weights: torch.Tensor | None = None,
                no_dropout: bool = False, max_physical_batch: int = 0) -> TrainStats:
    """Take exactly ``steps`` optimizer steps over ``loader`` (cycling it as needed).

    ``no_dropout``: dropout layers stay off (head-only training: the frozen model is a fixed feature extractor,
    and dropout would only add noise to its features).
    ``max_physical_batch`` (DP only): Poisson batches larger than this are processed in physical chunks with
    Opacus' batch splitting; the optimizer steps (and the accountant counts) once per logical batch, so
    the privacy accounting is unchanged. ``steps`` counts logical steps.
    """
    is_dp = hasattr(optimizer, "noise_multiplier")
    if is_dp and max_physical_batch > 0:
        from opacus.data_loader import DPDataLoader
        from opacus.utils.batch_memory_manager import wrap_data_loader

        if isinstance(loader, DPDataLoader):  # (an empty training set has nothing to split)
            loader = wrap_data_loader(data_loader=loader, max_batch_size=max_physical_batch, optimizer=optimizer)
    device = next(model.parameters()).device
    if class_weights is not None:
        class_weights = class_weights.to(device)
    model.train()
    if no_dropout:  # every module without a trainable weight in it (dropout layers, attention's dropout) evaluates
        for m in model.modules():
            if not any(p.requires_grad for p in m.parameters()):
                m.eval()
    total_loss, counted, examples, done, dropped = 0.0, 0, 0, 0, 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        while done < steps:
            seen = 0
            for batch in loader:
                seen += 1
                if done >= steps:
                    break
                n = int(batch[0].shape[0])
                if n == 0:
                    if is_dp:
                        _noise_only_step(optimizer)
                    done += 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                batch = [t.to(device) for t in batch]
                per_sample = batch_loss(model, batch, task=task, class_weights=class_weights, reduction="none")
                finite = torch.isfinite(per_sample.detach())
                # a non-finite loss contributes nothing (its gradient is zeroed below, or the step skipped)
                loss = torch.where(finite, per_sample, torch.zeros_like(per_sample)).mean()
                loss.backward()
                if is_dp:
                    dropped += drop_nonfinite(optimizer, finite)
                elif not finite.all() or not _grads_finite(optimizer):
                    dropped += n  # without per-sample gradients a bad record spoils the batch: skip the step
                    optimizer.zero_grad(set_to_none=True)
                optimizer.step()
                total_loss += float(per_sample.detach()[finite].sum())
                counted += int(finite.sum())
                examples += n
                if is_dp and optimizer._is_last_step_skipped:  # type: ignore[attr-defined]  (mid logical batch)
                    continue
                done += 1
                if progress:
                    progress(done, steps, total_loss / max(counted, 1))
            if not seen:  # no batch at all: a plain loader over no records (with DP, batches are Poisson, never none)
                break
    model.eval()
    if dropped:
        log.warning("%d sampled record(s) had a non-finite loss or gradient and contributed nothing this round "
                    "(the model received from the server drives them out of range)", dropped)
    return TrainStats(steps=done, mean_loss=total_loss / max(counted, 1), seconds=time.perf_counter() - start,
                      examples=examples, dropped=dropped)


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all())
               for g in optimizer.param_groups for p in g["params"])
