"""DP-SGD plumbing around Opacus, and the privacy accounting every node relies on.

Nothing here computes privacy by hand. Epsilon comes from Google's ``dp-accounting``
PLD accountant (near-exact; the default) or Opacus' RDP accountant; noise is
calibrated by searching the noise multiplier against the same accountant.
:func:`make_private` wraps a model, optimizer and loader so the training loop stays
the same with DP on or off.

A privacy *event* is ``(noise_multiplier, sample_rate, steps)``: ``steps``
Poisson-subsampled Gaussian releases at rate ``sample_rate`` (a rate of 1.0 is the
plain Gaussian mechanism with sensitivity 1, as used for evaluation answers).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from fedtune.common.errors import PrivacyError
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
History = list[Event]
ACCOUNTANTS = ("pld", "rdp")
DEFAULT_DELTA = 1e-5
PLD_DISCRETIZATION = 1e-3  # dp-accounting's pessimistic PLD: an upper bound at any discretization
# The PLD accountant's memory grows with the privacy loss it tracks: a history whose RDP epsilon (an upper bound,
# computed in closed form) is past this is reported at that bound; PLD would only tighten a figure far past any
# ceiling, at the cost of gigabytes (a server could otherwise run a node out of memory with a job of many
# near-noiseless releases: found by the property-based adversary).
PLD_RANGE = 100.0


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


def _clean(history: Iterable[Sequence]) -> History:
    return [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]


def epsilon(history: Iterable[Sequence], *, delta: float, kind: str) -> float:
    """Epsilon of the composed ``history`` at ``delta`` (0 for an empty history, inf with a noiseless event)."""
    events = _clean(history)
    if not events:
        return 0.0
    if any(s <= 0 for s, _, _ in events):
        return math.inf
    if kind == "pld":
        # (Σ n q²/z² is about the size of the loss the PLD tracks; below it, and with no near-noiseless release,
        # the PLD is small and the RDP bound is not worth computing)
        if any(s < 0.2 for s, _, _ in events) or sum(n * q * q / (s * s) for s, q, n in events) > 20:
            bound = _rdp_epsilon(events, delta)
            if bound > PLD_RANGE:
                return bound
        return _pld_epsilon(tuple(events), delta)
    if kind == "rdp":
        return _rdp_epsilon(events, delta)
    raise PrivacyError(f"unknown accountant {kind!r}", f"use one of {', '.join(ACCOUNTANTS)}")


@functools.lru_cache(maxsize=512)
def _pld_epsilon(events: tuple[Event, ...], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    merged: dict[tuple[float, float], int] = {}
    gauss_precision = 0.0  # Gaussian mechanisms (rate 1) compose exactly into one: 1/z^2 adds up
    for s, q, n in events:  # equal mechanisms compose as one self-composition (much faster)
        if q >= 1.0:
            gauss_precision += n / (s * s)
        else:
            merged[(s, q)] = merged.get((s, q), 0) + n
    if gauss_precision:  # (self-composing a Gaussian's PLD 10^6 times needed 8 GB; its closed form needs nothing)
        acc.compose(dp_accounting.GaussianDpEvent(1.0 / math.sqrt(gauss_precision)))
    for (s, q), n in merged.items():
        gauss = dp_accounting.GaussianDpEvent(s)
        event = gauss if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gauss)
        acc.compose(dp_accounting.SelfComposedDpEvent(event, n))
    return float(acc.get_epsilon(delta))


def _rdp_epsilon(events: History, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(events)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def calibrate(history_for: Callable[[float], History], *, target_epsilon: float, delta: float, kind: str,
              what: str = "training") -> float:
    """The smallest noise multiplier z (to 0.05%) with ``epsilon(history_for(z)) <= target_epsilon``.

    Raises:
        PrivacyError: when no noise level up to 1000 meets the target.
    """
    def eps(z: float) -> float:
        return epsilon(history_for(z), delta=delta, kind=kind)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 1000:
            raise PrivacyError(
                f"no noise level reaches epsilon={target_epsilon:g} at delta={delta:.2g} for {what}",
                "raise privacy.target-epsilon, or train fewer steps (train.rounds, train.local-epochs)")
    lo = hi / 2
    while eps(lo) <= target_epsilon:  # shrink until the lower end misses the target
        hi, lo = lo, lo / 2
        if lo < 1e-3:
            return hi
    while hi - lo > 5e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def suggested_delta(n_records: int) -> float:
    """A round delta for ``n_records``: the largest power of ten, at most 1e-5, below 1/(10 N)."""
    k = 5
    while 10.0 ** -k > 1.0 / (10 * max(1, n_records)):
        k += 1
    return float(f"1e-{k}")


def check_delta(delta: float, n_records: int, *, where: str) -> None:
    """Refuse a delta above 1/N for a source of N records (delta must be well below 1/N)."""
    if not 0 < delta <= 1.0 / max(1, n_records):
        raise PrivacyError(
            f"delta {delta:g} is too large for {where}, which holds {n_records:,} records: delta must be at most "
            f"1/N = {1.0 / max(1, n_records):.2g} (it bounds the chance that the guarantee fails for a record)",
            f"set delta={suggested_delta(n_records):g} in this node's configuration (node config `delta`, "
            "or privacy.delta for `fedtune local` and simulations)")


def fresh_generator() -> torch.Generator:
    """A torch generator seeded from the OS's CSPRNG: DP noise and Poisson sampling never repeat."""
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63))
    return g


def make_private(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float, grad_sample_mode: str, dataset: Dataset | None = None,
                 sample_rate: float | None = None, expected_batch_size: int | None = None,
                 loader: DataLoader | None = None):
    """Wrap model and optimizer with Opacus and Poisson-sample ``dataset`` at ``sample_rate``.

    Returns the model, optimizer, loader and the PrivacyEngine (whose accountant fedtune never reads).
    Batches are always Poisson-sampled at exactly the rate the ledger reserved (the only sampling the
    accountants here are valid for), and the sampling and the Gaussian noise draw from fresh OS entropy,
    never from the job seed. The summed clipped gradients plus noise are divided by ``expected_batch_size``
    (a planned figure, not the count of records present). ``loader`` instead of the three: Opacus' own
    rule (rate 1 / batches per pass). Call :func:`release` afterwards.
    """
    if loader is not None:
        dataset, sample_rate = loader.dataset, 1.0 / max(1, math.ceil(len(loader.dataset) / loader.batch_size))
        expected_batch_size = int(len(dataset) * sample_rate)
    if dataset is None or sample_rate is None or expected_batch_size is None:
        raise TypeError("make_private needs dataset, sample_rate and expected_batch_size (or a loader)")
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Optimal order is the")
        engine = PrivacyEngine(accountant="rdp")  # its accountant is never read: accounting is ours
    # an empty training set (a small source, a subsample) still takes its planned noise-only steps: whether it is
    # empty depends on the records, so it must not change what the node does or says
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=fresh_generator()) if len(dataset) else \
        EmptyPoissonLoader(dataset, sample_rate)
    with warnings.catch_warnings():  # the loader is already Poisson: Opacus is told not to wrap it again
        warnings.simplefilter("ignore")
        out = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=grad_sample_mode,
            noise_generator=fresh_generator(), loss_reduction="mean",
        )
    if len(out) == 4:  # ghost clipping also returns a criterion; we compute losses ourselves
        raise PrivacyError("privacy.grad-sample-mode=ghost needs Opacus' own criterion, which fedtune does not use",
                           "use privacy.grad-sample-mode=hooks (the fastest for LoRA here)")
    dp_model, dp_optimizer, dp_loader = out
    dp_model.forbid_grad_accumulation()  # one batch per step, as Opacus does for Poisson sampling
    if dp_loader.batch_sampler.sample_rate != sample_rate:  # a bug, not a user error
        raise RuntimeError(f"Opacus would sample at {dp_loader.batch_sampler.sample_rate}, the ledger reserved "
                           f"{sample_rate}")
    dp_optimizer.expected_batch_size = max(1, int(expected_batch_size))
    return dp_model, dp_optimizer, dp_loader, engine


class EmptyPoissonLoader:
    """Poisson sampling from an empty dataset: every batch is empty (Opacus' sampler refuses zero records)."""

    def __init__(self, dataset, sample_rate: float) -> None:
        self.dataset = dataset
        self.sample_rate = sample_rate
        self.batch_sampler = self  # what make_private's caller checks: the rate it samples at
        self._empty = [t[:0] for t in dataset.tensors]

    def __len__(self) -> int:
        return max(1, int(1 / self.sample_rate))

    def __iter__(self):
        for _ in range(len(self)):
            yield list(self._empty)


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
