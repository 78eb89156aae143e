"""What one node does for a job: prepare model + data, train a round privately, answer an evaluation.

This is the API the local command and the Flower ClientApp both call; it has no Flower
import. The node's own rules (:class:`NodePolicy`: which data source the budget belongs
to, the ceiling, delta, accountant, whether it answers evaluations) come from the
organization, never from the job. The order inside :func:`train_round` is the privacy
contract: reserve the round's spend in the ledger (refused past the ceiling), train,
settle the ledger entry (fsync'd), and only then pack the weights that leave the node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fedtune.common.errors import BudgetExceededError, EvaluationRefused, FedtuneError, PrivacyError, UnsafeMessage
from fedtune.common.privacy import accounting as privacy
from fedtune.common.privacy.ledger import PrivacyLedger, over_ceiling
from fedtune.common.training import adapter, aggregate, builder, data, features
from fedtune.common.training.aggregate import batch_weight
from fedtune.common.training.config import MAX_PLANNED_STEPS, JobConfig
from fedtune.common.training.evaluate import evaluate, predict, private_counts
from fedtune.common.training.fairness import cells_counts, node_cells
from fedtune.common.training.imbalance import MAX_WEIGHT, MIN_WEIGHT
from fedtune.common.training.model import LoraModel, set_threads
from fedtune.common.training.train import ProgressFn, TrainStats, make_optimizer, train_steps
from fedtune.common.training.wire import EvalAnswer, NodeRoundResult
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodePolicy:
    """What the organization decides for its node. A job may ask for less privacy loss, never more.

    Attributes:
        source: the data source this node's budget belongs to (a ledger per source; by default one per
            node; a new name starts a new budget, which only the organization can do).
        max_epsilon: the ceiling on everything released about the source, over all jobs.
        delta: the node's delta (at most 1/N for the source's N records).
        accountant: ``pld`` (near-exact, default) or ``rdp``.
        evaluate: whether the node answers federated evaluations (noised, accounted) at all.
        max_received_abs: the largest absolute value a received adapter may hold (a larger one is refused
            before any record is touched).
        max_received_norm: the largest L2 norm of all received adapter values together.
    """

    source: str
    max_epsilon: float
    delta: float = privacy.DEFAULT_DELTA
    accountant: str = "pld"
    evaluate: bool = True
    max_received_abs: float = 1e4
    max_received_norm: float = 1e6
    shared_content_ok: bool = False  # records released under another source of this node may be spent here too
    warn_large_jobs: bool = True  # warn when one job takes more than half of what is left (simulated nodes: off,
    # the researcher sets both the job and the simulated ceiling, and the demo spends its whole ceiling by design)


def check_received(arrays: Mapping[str, np.ndarray], policy: NodePolicy) -> None:
    """Refuse a received adapter outside the node's bounds: non-finite, or too large.

    Every value the server sends is checked against the organization's own bounds before the model sees a
    record, so the refusal depends on the message alone. The bounds keep the model's activations far from
    float overflow; the training loop's per-record guard (a non-finite loss or gradient contributes zero)
    holds whatever passes them.

    Raises:
        UnsafeMessage: a NaN or infinite value, a value above ``max_received_abs`` or a norm above
            ``max_received_norm``.
    """
    largest, squares = 0.0, 0.0
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.kind not in "fiu":
            raise UnsafeMessage(f"the server's adapter tensor {k[:120]!r} is not numeric ({a.dtype})", "refusing")
        a = a.astype(np.float64, copy=False)
        if a.size and not np.isfinite(a).all():
            raise UnsafeMessage(f"the server's adapter tensor {k[:120]!r} holds NaN or infinite values", "refusing")
        if a.size:
            largest = max(largest, float(np.abs(a).max()))
            squares += float(np.square(a).sum())
    norm = math.sqrt(squares)
    if largest > policy.max_received_abs or not math.isfinite(norm) or norm > policy.max_received_norm:
        raise UnsafeMessage(
            f"the server's adapter is out of this node's bounds: largest |value| {largest:.3g} (bound "
            f"max-received-abs={policy.max_received_abs:g}), norm {norm:.3g} (bound max-received-norm="
            f"{policy.max_received_norm:g})",
            "a fedtune server sends weights far inside these bounds; refusing the message before reading any "
            "record. If your federation's models really need larger values, raise the bounds in the node config")


def receive(node: Node, arrays: Mapping[str, np.ndarray]) -> None:
    """Load the server's adapter into the node's model after checking it against the node's bounds."""
    check_received(arrays, node.policy)
    adapter.unpack(node.lora.model, arrays, ffa=node.lora.ffa, head_only=node.lora.head_only)


@dataclass(frozen=True)
class JobSettings:
    """The job's settings a node acts on, taken once from the validated JobConfig (:meth:`of`)."""

    task: str
    dp: bool
    target_epsilon: float
    fixed_noise: float  # privacy.noise-multiplier (0: calibrate to the target)
    max_grad_norm: float
    grad_sample_mode: str
    eval_budget: float  # share of the target spent on noised evaluation answers
    wants_evaluations: bool  # the job asks nodes for federated evaluations at all
    rounds: int
    batch_size: int
    max_physical_batch: int
    eval_batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    seed: int

    @classmethod
    def of(cls, cfg: JobConfig) -> JobSettings:
        p, t = cfg.privacy, cfg.train
        return cls(task=cfg.model.task, dp=p.enabled, target_epsilon=p.target_epsilon, fixed_noise=p.noise_multiplier,
                   max_grad_norm=p.max_grad_norm, grad_sample_mode=p.grad_sample_mode, eval_budget=p.eval_budget,
                   wants_evaluations=cfg.fed.fraction_evaluate > 0, rounds=t.rounds, batch_size=t.batch_size,
                   max_physical_batch=t.max_physical_batch_size,
                   eval_batch_size=t.eval_batch_size, optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                   seed=t.seed)


@dataclass
class Node:
    """A node prepared for one job: its settings, model, tokenized splits, step plan and the source's ledger."""

    job: JobSettings
    policy: NodePolicy
    lora: LoraModel
    splits: data.Splits
    train_set: TensorDataset
    val_set: TensorDataset
    test_set: TensorDataset
    plan: privacy.StepPlan
    ledger: PrivacyLedger
    net: torch.nn.Module | None = None  # what trains and evaluates on the sets: the model, or its head on features

    def __post_init__(self) -> None:
        if self.net is None:
            self.net = self.lora.model


@dataclass(frozen=True)
class JobPlan:
    """A job's noise on this node, calibrated once at its first release and kept in the ledger."""

    noise_multiplier: float  # DP-SGD noise (0.0 when DP is off)
    eval_noise: float  # std of the Gaussian noise on an evaluation answer's counts (0.0: answers no evaluations)
    evaluations: int  # federated evaluations planned into the budget
    rounds: int


@dataclass(frozen=True)
class RoundResult:
    arrays: dict[str, np.ndarray]  # the exchanged adapter tensors after training
    stats: TrainStats
    weight: int  # FedAvg weight: training records rounded up to whole batches (never the exact count)
    epsilon_spent: float  # total spent on this source after this round (ledger)
    noise_multiplier: float
    sample_rate: float
    delta: float
    steps: int



def prepare(cfg: JobConfig, policy: NodePolicy, *, state_dir: str | Path, data_path: str | None = None,
            model: LoraModel | Callable[[list[str]], LoraModel] | None = None, for_training: bool = True,
            splits: data.Splits | None = None, cache_dir: str | Path | None = None) -> Node:
    """Load data and model for ``cfg`` on this node and open the ledger of its data source: the one way a Node is
    built (records, model and tokens all through :mod:`builder`).

    Args:
        cfg: the job configuration (the node's own settings already applied).
        policy: the node's privacy rules (its organization's, not the job's).
        state_dir: this node's state directory (holds the privacy ledgers).
        data_path: overrides ``cfg.data.path`` (a node's own file).
        model: reuse an already built model, or a function of the labels giving one (a process's shared model);
            None: build it.
        for_training: False to only evaluate (no size check).
        splits: already loaded records (simulated nodes get a partition); skips reading files.
        cache_dir: keep tokenized data here, so a fresh process per message (Flower's
            subprocess isolation) does not redo it.

    Raises:
        DataError, ModelError, PrivacyError, LedgerError: with what to fix.
    """
    set_threads(cfg.train.threads)
    splits = splits or builder.load_records(cfg, data_path, own_source=for_training)
    if for_training:
        data.check_trainable_size(splits.planned_train, cfg.train.batch_size, splits.train.source)
    if model is None:
        model = builder.build_model(cfg, splits.labels)
    elif callable(model):
        model = model(splits.labels)
    sets = builder.tokenized(cfg, model, splits, "train", "val", "test", cache_dir=cache_dir)
    sets, net = with_features(cfg, model, sets, cache_dir=cache_dir)
    ledger = PrivacyLedger(state_dir, source=policy.source, max_epsilon=policy.max_epsilon, delta=policy.delta,
                           accountant=policy.accountant, shared_content_ok=policy.shared_content_ok)
    t = cfg.train
    plan = privacy.plan_steps(n_train=splits.planned_train, batch_size=t.batch_size,
                              local_epochs=t.local_epochs, local_steps=t.local_steps, rounds=t.rounds)
    return Node(job=JobSettings.of(cfg), policy=policy, lora=model, splits=splits, train_set=sets[0], val_set=sets[1],
                test_set=sets[2], plan=plan, ledger=ledger, net=net)


def with_features(cfg: JobConfig, lora: LoraModel, sets: list[TensorDataset], *, cache_dir: str | Path | None = None
                  ) -> tuple[list[TensorDataset], torch.nn.Module]:
    """For a head-only classifier (``train.cache-features``): the sets as the head's input features, computed once,
    and the head to train and evaluate on them (:mod:`fedtune.common.training.features`); else the sets and model."""
    if not cfg.train.cache_features or cfg.model.task != "seq-cls":
        return sets, lora.model
    head = features.feature_head(lora.model)
    if head is None:
        return sets, lora.model
    t0 = time.perf_counter()
    out = [features.extract(lora.model, s, base_path=lora.base_path, batch_size=cfg.train.eval_batch_size,
                            cache_dir=cache_dir) for s in sets]
    log.info("features of %d records computed once for this job in %.1fs (the encoder is frozen)",
             sum(len(s) for s in sets), time.perf_counter() - t0)
    return out, head


# -- the job's noise plan ---------------------------------------------------------------------
def planned_evaluations(node: Node, *, federated: bool) -> int:
    """Federated evaluations a job's budget plans for: one per round, if the job and the node want them."""
    j = node.job
    if not federated or not node.policy.evaluate or j.eval_budget <= 0 or not j.wants_evaluations:
        return 0
    return j.rounds


def job_events(plan: privacy.StepPlan, noise: float, eval_noise: float, evaluations: int) -> privacy.History:
    """A job's planned releases on a node: its training steps at ``noise``, then its evaluation answers (if any)."""
    events = [(noise, plan.sample_rate, plan.total_steps)]
    if evaluations:
        events.append((eval_noise, 1.0, evaluations))
    return events


def budget_warning(job: str, *, planned: float, spent: float, ceiling: float, source: str) -> str | None:
    """A warning when one job would take more than half of what is left of a source's budget (else None).

    It reads only the job's plan and the ledger (what was spent, the ceiling), never the records; it refuses
    nothing (the ceiling does that)."""
    remaining = ceiling - spent
    if not (math.isfinite(remaining) and math.isfinite(planned)) or remaining <= 0 or planned <= remaining / 2:
        return None
    return (f"job {job!r} would spend epsilon {planned:.2f} of the {remaining:.2f} left on data source {source!r} "
            f"(ceiling {ceiling:g}, spent {spent:.2f}): more than half of this node's remaining budget in one job; "
            "for a trial, ask for less with a smaller privacy.target-epsilon (e.g. privacy.target-epsilon=1)")


def job_plan(node: Node, job: str, *, federated: bool = True, warn: Callable[[str], None] | None = None) -> JobPlan:
    """This job's noise on this node, calibrated at its first release and kept in the source's ledger.

    The job's releases (its training steps and planned evaluation answers) are calibrated to
    ``min(job target, node ceiling)``, evaluation answers getting ``privacy.eval-budget`` of
    it; a job that would take the source past the ceiling together with what was released
    before is refused before its first step (and every single release is checked again when
    it is reserved).

    When it is planned, a job that would take more than half of what is left of the budget is warned about
    (``warn``, default: this node's log at WARNING), never refused for it.

    Raises:
        BudgetExceededError: the job does not fit in what is left of the source's budget.
    """
    j, pol, p = node.job, node.policy, node.plan
    evals = planned_evaluations(node, federated=federated)
    spec = {"dp": j.dp, "target": j.target_epsilon, "fixed_noise": j.fixed_noise, "eval_budget": j.eval_budget, "evals": evals, "q": p.sample_rate, "steps": p.steps_per_round,
            "rounds": p.rounds, "ceiling": pol.max_epsilon, "delta": pol.delta, "accountant": pol.accountant}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    if p.total_steps > MAX_PLANNED_STEPS:  # before any accounting: a plan this size costs minutes and gigabytes
        raise PrivacyError(
            f"the job plans {p.total_steps:,} DP-SGD steps on this node ({p.rounds} rounds of {p.steps_per_round:,}); "
            f"this node accounts at most {MAX_PLANNED_STEPS:,} per job",
            "run a job with fewer rounds, fewer local steps or epochs, or larger batches")

    def compute(_history: privacy.History) -> dict:  # the ledger's history, which node.ledger.epsilon composes
        kw = {"delta": pol.delta, "kind": pol.accountant}
        target = min(j.target_epsilon, pol.max_epsilon)
        if not j.dp:
            return {"noise_multiplier": 0.0, "eval_noise": 0.0, "evaluations": evals, "rounds": p.rounds}
        eval_noise = 0.0
        if evals:
            eval_noise = privacy.calibrate(lambda z: [(z, 1.0, evals)], target_epsilon=j.eval_budget * target,
                                           what="evaluation answers", **kw)
        if j.fixed_noise:
            noise = j.fixed_noise
        else:
            noise = privacy.calibrate(lambda z: job_events(p, z, eval_noise, evals), target_epsilon=target, **kw)
        after = node.ledger.epsilon(job_events(p, noise, eval_noise, evals))
        if over_ceiling(after, pol.max_epsilon):  # what was released before this job counts against the ceiling too
            raise BudgetExceededError(
                f"privacy budget exceeded for data source {pol.source!r}: spent epsilon "
                f"{node.ledger.epsilon():.3f} of this node's ceiling {pol.max_epsilon:g}; this job "
                f"({p.total_steps} steps at noise {noise:.3f}, {evals} evaluation answers) would bring it to "
                f"{after:.3f}", "run a job that asks for less (a lower privacy.target-epsilon, fewer rounds or steps), "
                "or have the node's administrator raise its ceiling knowingly; the spent budget cannot be returned")
        if pol.warn_large_jobs:
            before = node.ledger.epsilon()  # as the lock just read it: everything released before this job
            message = budget_warning(job, planned=after - before, spent=before, ceiling=pol.max_epsilon,
                                     source=pol.source)
            if message:
                (warn or log.warning)(message)
        return {"noise_multiplier": noise, "eval_noise": eval_noise, "evaluations": evals, "rounds": p.rounds}

    plan = node.ledger.plan(job, key, compute)
    return JobPlan(noise_multiplier=float(plan["noise_multiplier"]), eval_noise=float(plan["eval_noise"]),
                   evaluations=int(plan["evaluations"]), rounds=int(plan["rounds"]))


def planned_epsilon(node: Node, job: str, *, federated: bool = True) -> float:
    """Epsilon this job alone spends over all its planned releases (inf without DP)."""
    jp = job_plan(node, job, federated=federated)
    if jp.noise_multiplier <= 0:
        return math.inf
    events = job_events(node.plan, jp.noise_multiplier, jp.eval_noise, jp.evaluations)
    return privacy.epsilon(events, delta=node.policy.delta, kind=node.policy.accountant)


# -- releases ---------------------------------------------------------------------------------------
ROUND_SEED_STRIDE = 1_000_003  # a prime: distinct (train.seed, round) pairs give distinct torch seeds


def round_seed(seed: int, round: int) -> int:
    """The torch seed of a round's dropout and (non-DP) data order (DP noise always uses fresh OS entropy)."""
    return seed * ROUND_SEED_STRIDE + round


def train_round(node: Node, *, job: str, round: int, initial: Mapping[str, np.ndarray] | None = None,
                progress: ProgressFn | None = None, federated: bool = True,
                class_weights: Sequence[float] | None = None) -> RoundResult:
    """Train one round on this node and return the adapter update.

    ``class_weights`` (one per label, from data the server holds, never from this node's records) scale
    each record's loss; refused unless they fit the node's labels and bounds.

    Reserves the round's spend first (refused, before any training, past the node's ceiling or
    past the job's planned rounds); the ledger entry is settled and durable before this returns weights.
    """
    j, model = node.job, node.net
    if initial is not None:  # the message first: a refusal here depends on nothing but the message
        check_received(initial, node.policy)
    weights = _check_class_weights(class_weights, node.splits.labels, j.task)
    jp = job_plan(node, job, federated=federated)
    if initial is not None:
        receive(node, initial)
    steps, q = node.plan.steps_per_round, node.plan.sample_rate
    noise = jp.noise_multiplier if j.dp else 0.0
    entry = node.ledger.reserve(job=job, round=round, kind="train", noise_multiplier=noise, sample_rate=q, steps=steps,
                                fingerprint=node.splits.fingerprint, n_records=node.splits.n_source,
                                job_limit=jp.rounds)
    try:
        torch.manual_seed(round_seed(j.seed, round))
        optimizer = make_optimizer(model, name=j.optimizer, lr=j.lr, weight_decay=j.weight_decay)
        model.train()  # Opacus refuses a model in eval mode
        if j.dp:
            # Poisson sampling at the planned rate q (from the source's size, as reserved), and the mean over the
            # planned batch: neither depends on which records landed in train
            dp_model, dp_opt, dp_loader, _ = privacy.make_private(
                model=model, optimizer=optimizer, dataset=node.train_set, sample_rate=q,
                expected_batch_size=max(1, int(node.splits.planned_train * q + 0.5)), noise_multiplier=noise,
                max_grad_norm=j.max_grad_norm, grad_sample_mode=j.grad_sample_mode)
            try:
                stats = train_steps(dp_model, dp_loader, dp_opt, steps=steps, task=j.task, progress=progress,
                                    class_weights=weights, no_dropout=node.lora.head_only,
                                    max_physical_batch=j.max_physical_batch)
            finally:
                privacy.release(dp_model)
        else:
            loader = DataLoader(node.train_set, batch_size=j.batch_size, shuffle=len(node.train_set) > 0,
                                generator=torch.Generator().manual_seed(round_seed(j.seed, round)))
            stats = train_steps(model, loader, optimizer, steps=steps, task=j.task, progress=progress,
                                class_weights=weights, no_dropout=node.lora.head_only)
    except BaseException:
        node.ledger.cancel(entry)  # nothing derived from this training has left the node
        raise
    entry = node.ledger.settle(entry, steps=stats.steps)
    arrays = adapter.pack(node.lora.model, ffa=node.lora.ffa, head_only=node.lora.head_only)
    return RoundResult(arrays=arrays, stats=stats, weight=batch_weight(node.splits.planned_train, j.batch_size),
                       epsilon_spent=entry.epsilon_after, noise_multiplier=noise, sample_rate=q,
                       delta=node.policy.delta, steps=entry.steps)


def _check_class_weights(weights: Sequence[float] | None, labels: Sequence[str], task: str) -> torch.Tensor | None:
    if weights is None:
        return None
    if task != "seq-cls" or len(weights) != len(labels):
        raise FedtuneError(f"the round's class weights ({len(weights)}) do not fit this node's {len(labels)} labels",
                           "the server and the node must use the same data.labels; refusing the round")
    if not all(isinstance(w, float) and MIN_WEIGHT <= w <= MAX_WEIGHT for w in weights):
        raise FedtuneError(f"class weights outside [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}]: {list(weights)[:10]}",
                           "a fedtune server clips its weights to these bounds; refusing the round")
    return torch.tensor(list(weights), dtype=torch.float32)


def train_and_report(node: Node, received: Mapping[str, np.ndarray], *, job: str, round: int,
                     class_weights: Sequence[float] | None = None) -> NodeRoundResult:
    """One federated round on this node from the received global adapter: what the node sends back.

    The update is the trained minus the received tensors; the weight follows :func:`batch_weight`."""
    t0 = time.perf_counter()
    r = train_round(node, job=job, round=round, initial=received, class_weights=class_weights)
    # the training loss is a function of the records with no noise on it: it stays in the node's own log
    log.info("job %s round %d: mean training loss %.4f over %d sampled records, %d steps, %.1fs", job, round,
             r.stats.mean_loss, r.stats.examples, r.stats.steps, time.perf_counter() - t0)
    update = aggregate.update(r.arrays, received)
    for k, v in update.items():  # cannot happen after the per-record guard; never send a non-finite value anyway
        if not np.isfinite(v).all():
            log.error("job %s round %d: non-finite values in the update tensor %s were zeroed (a bug: report it)",
                      job, round, k)
            update[k] = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    return NodeRoundResult(update=update, weight=r.weight, epsilon=r.epsilon_spent,
                           max_epsilon=node.policy.max_epsilon, delta=r.delta, noise_multiplier=r.noise_multiplier,
                           sample_rate=r.sample_rate, steps=r.steps)


def answer_evaluation(node: Node, *, job: str, round: int, groups: Sequence[str] = ()) -> EvalAnswer:
    """A federated-evaluation answer on the node's test split: counts with calibrated Gaussian noise.

    The answer is a release about the node's records like any other: it is reserved in the
    source's ledger first (refused past the ceiling or past the job's planned evaluations).
    With ``groups`` (the server's audit groups) and a group column on this node, the answer is the
    per-group confusion histogram instead (fedtune.common.training.fairness): same sensitivity, same
    noise, same ledger entry; the counts are then sums of its noised cells.

    Raises:
        EvaluationRefused: the node's policy answers no evaluations, or the job planned none.
        BudgetExceededError: the answer would pass the ceiling.
    """
    if not node.policy.evaluate:
        raise EvaluationRefused("this node answers no federated evaluation (node config evaluate=off)",
                                "the server's own held-out evaluation still measures the model")
    jp = job_plan(node, job)
    if node.job.dp and jp.evaluations == 0:
        raise EvaluationRefused(
            f"job {job!r} planned no evaluation answers on this node (privacy.eval-budget=0 or "
            "fed.fraction-evaluate=0)", "set privacy.eval-budget > 0 for federated evaluation in a new job")
    task = node.job.task
    own_groups = node.splits.test.groups
    audit = bool(groups) and task == "seq-cls" and len(own_groups) == len(node.test_set)
    sensitivity = 1.0 if task == "seq-cls" else math.sqrt(2.0)  # one record moves one count (or cell) by one
    std = jp.eval_noise * sensitivity
    entry = node.ledger.reserve(job=job, round=round, kind="eval", noise_multiplier=jp.eval_noise, sample_rate=1.0,
                                steps=1, fingerprint=node.splits.fingerprint, n_records=node.splits.n_source,
                                job_limit=jp.evaluations if node.job.dp else None)
    try:
        if audit:
            probs = predict(node.net, node.test_set, batch_size=node.job.eval_batch_size)
            pred = probs.argmax(-1) if len(probs) else np.zeros(0, dtype=np.int64)  # a test split may be empty
            exact = node_cells(node.test_set.tensors[2].numpy(), pred, own_groups, groups, len(node.splits.labels))
        else:
            exact = private_counts(node.net, node.test_set, task=task, batch_size=node.job.eval_batch_size)
    except BaseException:
        node.ledger.cancel(entry)
        raise
    entry = node.ledger.settle(entry)
    rng = np.random.default_rng(secrets.randbits(128))  # fresh OS entropy, never a job seed
    noised = exact + rng.normal(0.0, std, size=exact.shape) if std > 0 else exact
    if audit:
        return EvalAnswer(counts=cells_counts(noised, len(node.splits.labels)), noise_std=std,
                          epsilon=entry.epsilon_after, cells=tuple(float(c) for c in noised))
    return EvalAnswer(counts=(float(noised[0]), float(noised[1])), noise_std=std, epsilon=entry.epsilon_after)


def evaluate_split(node: Node, split: str = "test") -> dict:
    """Exact metrics of the node's current model on its own split, for the node's own eyes (not a release)."""
    ds = {"train": node.train_set, "val": node.val_set, "test": node.test_set}[split]
    groups = {"train": node.splits.train, "val": node.splits.val, "test": node.splits.test}[split].groups
    return evaluate(node.net, ds, task=node.job.task, labels=node.splits.labels,
                    batch_size=node.job.eval_batch_size, groups=groups)


# -- a node's disk cache (derived data only: safe to delete) -----------------------------------
