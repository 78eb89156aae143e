"""DP-SGD plumbing around Opacus: sampling plan, noise calibration, accounting.

Nothing here computes privacy by hand: calibration and epsilon come from
Opacus' accountants (RDP by default). :func:`make_private` wraps a model,
optimizer and loader so the training loop stays the same with DP on or off.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from common.errors import PrivacyError

log = logging.getLogger(__name__)

History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps), Opacus' accountant.history


@dataclass(frozen=True)
class StepPlan:
    """How many DP-SGD steps a node takes, and at what Poisson sampling rate."""

    sample_rate: float  # q, as Opacus derives it: 1 / ceil(N / batch_size)
    steps_per_round: int
    rounds: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds


def plan_steps(*, n_train: int, batch_size: int, local_epochs: float, local_steps: int, rounds: int) -> StepPlan:
    """The sampling rate and step counts for ``n_train`` records (matches Opacus' DPDataLoader)."""
    batches_per_epoch = math.ceil(n_train / batch_size)
    steps = local_steps if local_steps > 0 else max(1, round(local_epochs * batches_per_epoch))
    return StepPlan(sample_rate=1.0 / batches_per_epoch, steps_per_round=steps, rounds=rounds)


def default_delta(n_records: int) -> float:
    """min(1e-5, 1/(10 N)): comfortably below 1/N, as DP practice requires."""
    return min(1e-5, 1.0 / (10 * max(1, n_records)))


def accountant(kind: str, history: Iterable[tuple[float, float, int]] = ()):
    """A fresh Opacus accountant of ``kind`` holding ``history``."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=kind)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon(history: Iterable[tuple[float, float, int]], *, delta: float, kind: str) -> float:
    """Epsilon of the composed ``history`` at ``delta`` (0 for an empty history)."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant(kind, history).get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, plan: StepPlan, kind: str) -> float:
    """The smallest noise multiplier (within 0.01 in epsilon) meeting the target over the whole plan."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=plan.sample_rate, steps=plan.total_steps,
                                              accountant=kind, epsilon_tolerance=0.01))
    except ValueError as e:
        raise PrivacyError(
            f"no noise level reaches epsilon={target_epsilon} at delta={delta:.2g} over {plan.total_steps} steps "
            f"at sampling rate {plan.sample_rate:.4f} ({e})",
            "raise privacy.target-epsilon, or train fewer steps (train.rounds, train.local-epochs)",
        ) from None


def fresh_generator() -> torch.Generator:
    """A torch generator seeded from the OS's CSPRNG: DP noise and Poisson sampling never repeat."""
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63))
    return g


def make_private(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str, poisson_sampling: bool,
                 kind: str):
    """Wrap model, optimizer and loader with Opacus; returns them and the PrivacyEngine.

    The loader's Poisson sampling and the Gaussian noise draw from fresh OS
    entropy, never from the job seed. Call :func:`release` afterwards.
    """
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Optimal order is the")
        engine = PrivacyEngine(accountant=kind)
    if poisson_sampling:
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, generator=fresh_generator())
    out = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=poisson_sampling, grad_sample_mode=grad_sample_mode,
        noise_generator=fresh_generator(), loss_reduction="mean",
    )
    if len(out) == 4:  # ghost clipping also returns a criterion; we compute losses ourselves
        raise PrivacyError("privacy.grad-sample-mode=ghost needs Opacus' own criterion, which fedtune does not use",
                           "use privacy.grad-sample-mode=hooks (the fastest for LoRA here)")
    dp_model, dp_optimizer, dp_loader = out
    return dp_model, dp_optimizer, dp_loader, engine


def release(dp_model: torch.nn.Module) -> None:
    """Remove Opacus' hooks and per-sample buffers so the model can be wrapped again or saved."""
    close = getattr(dp_model, "_close", None)
    if callable(close):
        close()
    for p in dp_model.parameters():
        for attr in ("grad_sample", "_forward_counter", "summed_grad"):
            if hasattr(p, attr):
                try:
                    delattr(p, attr)
                except AttributeError:
                    setattr(p, attr, None)


DP_OFF_WARNING = ("DIFFERENTIAL PRIVACY IS OFF (privacy.enabled=false): updates carry no formal guarantee and can "
                  "reveal individual training records. Use this only for non-sensitive data or baselines.")
_warned: set[str] = set()


def warn_dp_off(job: str) -> None:
    """Log the DP-off warning in this node's log, once per process and job (not once per round).

    Drivers that talk to a user (``fedtune local``, ``fedtune simulate``) print it themselves, once.
    """
    if job not in _warned:
        _warned.add(job)
        log.warning(DP_OFF_WARNING)
