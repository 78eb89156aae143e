"""What the run directory holds, typed: one line of ``rounds.jsonl`` (:class:`RoundRecord`), ``summary.json``
(:class:`RunSummary`) and, while a run goes on, ``progress.json`` (:class:`RoundProgress`).

``to_json`` gives the dict stored on disk, under the keys fedtune has always written (so run directories and the
docs stay valid); ``from_json`` reads whatever a fedtune server wrote, old run directories included: a missing
key takes its default, fedtune 0.1's dashed per-node keys are mapped (``stored_figures``), and the nodes'
worst accuracy, stored as ``worst_accuracy``, is read from either that key or ``worst_node_accuracy``.

Only :class:`~fedtune.common.operations.rundir.RunDir` reads and writes these files; everything else gets these
objects from it (``RunDir.rounds()``, ``RunDir.summary()``) and reads attributes, never raw keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields


# fedtune 0.1 stored per-node figures under the wire's dashed keys (a frozen old file format, not the live wire)
_LEGACY_KEYS = {"max-epsilon": "max_epsilon", "noise-multiplier": "noise_multiplier", "sample-rate": "sample_rate",
                "noise-std": "noise_std", "loss-sum": "loss_sum", "train-loss": "train_loss"}


def stored_figures(m: Mapping) -> dict:
    """A node's figures as stored in a run directory, under today's names (fedtune 0.1's dashed keys mapped)."""
    return {_LEGACY_KEYS.get(k, k): v for k, v in m.items()}


def _num(v) -> float | None:
    """A stored number (int, float or numpy scalar), else None."""
    if isinstance(v, bool) or v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    return v if isinstance(v, (int, float)) else None


def _int(v, default: int | None = 0) -> int | None:
    n = _num(v)
    return int(n) if n is not None else default


def _str(v, default: str | None = None) -> str | None:
    return str(v) if v is not None else default


def _dict(v) -> dict | None:
    return dict(v) if isinstance(v, Mapping) else None


def _map(v) -> dict:
    """A stored mapping (a malformed one reads as empty)."""
    return dict(v) if isinstance(v, Mapping) else {}


def _seq(v) -> list | tuple:
    return v if isinstance(v, (list, tuple)) else ()


def _strs(v) -> tuple[str, ...]:
    return tuple(str(x) for x in _seq(v))


def _freeze(obj, **conv) -> None:
    """Normalise sequence fields given as lists to tuples (frozen dataclasses compare by value)."""
    for name, fn in conv.items():
        object.__setattr__(obj, name, fn(getattr(obj, name)))


def _optional(values: dict, keep: Iterable[str]) -> dict:
    """``values`` without the None-valued entries, except those named in ``keep`` (always written)."""
    keep = set(keep)
    return {k: v for k, v in values.items() if v is not None or k in keep}


# -- one node in a round --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeFigures:
    """A node's part of a round: who it said it is, how its reply went (``ok`` / ``refused`` / ``unsafe`` /
    ``error`` / ``dropped``), the accountant its epsilon figures come from (its own report) and its
    ``NodeRoundResult.figures()`` (common/training/wire.py)."""

    name: str | None = None
    status: str = "ok"
    accountant: str | None = None  # "pld" / "rdp" as the node reported it; None: not reported (fedtune 0.1)
    weight: int | None = None
    epsilon: float | None = None  # the node's total spend on its data source after this round
    max_epsilon: float | None = None  # the node's ceiling
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None

    @classmethod
    def of(cls, name: str, status: str, accountant: str | None, figures: Mapping) -> NodeFigures:
        """A node's reply as the round records it (``figures``: its ``NodeRoundResult.figures()``, every figure the
        node reported)."""
        return cls(name=name, status=status, accountant=accountant, **figures)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, m: Mapping) -> NodeFigures:
        m = stored_figures(m)  # fedtune 0.1 stored the wire's dashed keys
        return cls(name=_str(m.get("name")), status=_str(m.get("status"), "ok"), accountant=_str(m.get("accountant")),
                   weight=_int(m.get("weight"), None), epsilon=_num(m.get("epsilon")),
                   max_epsilon=_num(m.get("max_epsilon")), delta=_num(m.get("delta")),
                   noise_multiplier=_num(m.get("noise_multiplier")), sample_rate=_num(m.get("sample_rate")),
                   steps=_int(m.get("steps"), None))


@dataclass(frozen=True)
class Failure:
    """A node that did not deliver in a round, and why (``stage``: "after training" for a refusal after its
    training reply, e.g. while unmasking)."""

    node: str
    status: str
    reason: str = ""
    key: str | None = None  # the key its figures are recorded under (absent in fedtune 0.1)
    stage: str | None = None

    def to_json(self) -> dict:
        return _optional({"node": self.node, "key": self.key, "status": self.status, "reason": self.reason,
                          "stage": self.stage}, keep=("node", "status", "reason"))

    @classmethod
    def from_json(cls, m: Mapping) -> Failure:
        return cls(node=str(m.get("node", m.get("key", "?"))), status=str(m.get("status", "error")),
                   reason=str(m.get("reason") or ""), key=_str(m.get("key")), stage=_str(m.get("stage")))

    @property
    def who(self) -> str:
        """The node's key (its name in runs that recorded none)."""
        return self.key if self.key is not None else self.node


# -- federated evaluation ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalFigures:
    """A node's noised evaluation answer as pooled (``evaluate.pool_answers``): seq-cls ``correct`` / ``wrong`` /
    ``accuracy``, causal-lm ``records`` / ``loss_sum`` / ``loss``; estimates, each with noise ``noise_std``."""

    name: str | None = None
    epsilon: float | None = None  # the node's spend after this answer
    noise_std: float | None = None
    accountant: str | None = None
    correct: float | None = None
    wrong: float | None = None
    accuracy: float | None = None
    records: float | None = None
    loss_sum: float | None = None
    loss: float | None = None

    def to_json(self) -> dict:
        return _optional({f.name: getattr(self, f.name) for f in fields(self)}, keep=("name", "epsilon", "noise_std"))

    @classmethod
    def from_json(cls, m: Mapping) -> EvalFigures:
        m = stored_figures(m)
        return cls(name=_str(m.get("name")), accountant=_str(m.get("accountant")),
                   **{f.name: _num(m.get(f.name)) for f in fields(cls) if f.name not in ("name", "accountant")})


@dataclass(frozen=True)
class FederatedEval:
    """The round's federated evaluation: the nodes' noised answers pooled (estimates)."""

    nodes: int = 0  # nodes that answered
    failed: tuple[str, ...] = ()  # nodes asked that did not
    noised: bool = True
    accuracy: float | None = None  # seq-cls: pooled over every answer
    worst_node_accuracy: float | None = None  # seq-cls; stored as "worst_accuracy"
    worst_node: str | None = None
    loss: float | None = None  # causal-lm
    fairness: dict | None = None  # the nodes' pooled group audit (fairness.pool_cells)
    per_node: dict[str, EvalFigures] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _freeze(self, failed=tuple)

    def to_json(self, *, per_node: bool = True) -> dict:
        out = _optional({"nodes": self.nodes, "failed": list(self.failed), "noised": self.noised,
                         "accuracy": self.accuracy, "worst_accuracy": self.worst_node_accuracy,
                         "worst_node": self.worst_node, "loss": self.loss, "fairness": self.fairness},
                        keep=("nodes", "failed", "noised"))
        if per_node:
            out["per_node"] = {k: m.to_json() for k, m in self.per_node.items()}
        return out

    @classmethod
    def from_json(cls, m: Mapping | None) -> FederatedEval | None:
        if not isinstance(m, Mapping):
            return None
        worst = m.get("worst_node_accuracy", m.get("worst_accuracy"))
        return cls(nodes=_int(m.get("nodes")), failed=_strs(m.get("failed")), noised=bool(m.get("noised", True)),
                   accuracy=_num(m.get("accuracy")), worst_node_accuracy=_num(worst),
                   worst_node=_str(m.get("worst_node")), loss=_num(m.get("loss")), fairness=_dict(m.get("fairness")),
                   per_node={str(k): EvalFigures.from_json(v) for k, v in _map(m.get("per_node")).items()
                             if isinstance(v, Mapping)})


# -- one round -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundRecord:
    """One line of ``rounds.jsonl``: a finished round as the server saw it.

    ``server_eval`` is ``{"val": ..., "test": ...}`` of ``evaluate.evaluate`` without the per-class table
    (``server_per_class``, the test split's); ``timing`` and ``secagg`` are the aggregator's own figures.
    """

    round: int
    status: str = "ok"  # "ok", or "failed": the model did not change
    reason: str = ""  # why it failed
    started: float | None = None  # wall clock (time.time()) at the round's start
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)  # seconds per stage (train, server_eval, ...)
    aggregation: str | None = None
    secure_aggregation: bool = False
    nodes_connected: int | None = None
    nodes_asked: int = 0
    nodes_replied: int = 0
    nodes_benched: tuple[str, ...] = ()  # connected but not asked
    failures: tuple[Failure, ...] = ()
    epsilon_per_node: dict[str, float | None] = field(default_factory=dict)
    epsilon_max: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    exchanges: int = 0
    server_eval: dict[str, dict] | None = None
    server_per_class: dict | None = None
    federated_eval: FederatedEval | None = None
    secagg: dict | None = None
    per_node: dict[str, NodeFigures] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _freeze(self, nodes_benched=tuple, failures=tuple)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def server_test(self) -> dict:
        return (self.server_eval or {}).get("test") or {}

    @property
    def server_val(self) -> dict:
        return (self.server_eval or {}).get("val") or {}

    @property
    def accountants(self) -> set[str]:
        """The accountants the round's nodes reported their epsilons in (training and evaluation answers)."""
        evals = self.federated_eval.per_node.values() if self.federated_eval else ()
        return {m.accountant for m in [*self.per_node.values(), *evals] if m.accountant}

    def to_json(self) -> dict:
        return {
            "round": self.round, "status": self.status, "reason": self.reason, "started": self.started,
            "seconds": self.seconds, "timing": dict(self.timing), "aggregation": self.aggregation,
            "secure_aggregation": self.secure_aggregation, "nodes_connected": self.nodes_connected,
            "nodes_asked": self.nodes_asked, "nodes_replied": self.nodes_replied,
            "nodes_benched": list(self.nodes_benched), "failures": [f.to_json() for f in self.failures],
            "epsilon_per_node": dict(self.epsilon_per_node), "epsilon_max": self.epsilon_max,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "exchanges": self.exchanges,
            "server_eval": self.server_eval, "server_per_class": self.server_per_class,
            "federated_eval": self.federated_eval.to_json() if self.federated_eval else None,
            "secagg": self.secagg, "per_node": {k: m.to_json() for k, m in self.per_node.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping) -> RoundRecord:
        """A stored round line; raises KeyError / TypeError / ValueError when it names no round."""
        rnd = d["round"]
        if isinstance(rnd, bool) or not isinstance(rnd, int):
            raise ValueError(f"not a round number: {rnd!r}")
        return cls(
            round=rnd, status=str(d.get("status", "ok")), reason=str(d.get("reason") or ""),
            started=_num(d.get("started")), seconds=_num(d.get("seconds")) or 0.0,
            timing={str(k): v for k, v in _map(d.get("timing")).items()},
            aggregation=_str(d.get("aggregation")), secure_aggregation=bool(d.get("secure_aggregation", False)),
            nodes_connected=_int(d.get("nodes_connected"), None), nodes_asked=_int(d.get("nodes_asked")),
            nodes_replied=_int(d.get("nodes_replied")), nodes_benched=_strs(d.get("nodes_benched")),
            failures=tuple(Failure.from_json(f) for f in _seq(d.get("failures")) if isinstance(f, Mapping)),
            epsilon_per_node={str(k): _num(v) for k, v in _map(d.get("epsilon_per_node")).items()},
            epsilon_max=_num(d.get("epsilon_max")), bytes_sent=_int(d.get("bytes_sent")),
            bytes_received=_int(d.get("bytes_received")), exchanges=_int(d.get("exchanges")),
            server_eval=_dict(d.get("server_eval")), server_per_class=_dict(d.get("server_per_class")),
            federated_eval=FederatedEval.from_json(d.get("federated_eval")), secagg=_dict(d.get("secagg")),
            per_node={str(k): NodeFigures.from_json(m) for k, m in _map(d.get("per_node")).items()
                      if isinstance(m, Mapping)},
        )


# -- where a running server is --------------------------------------------------------------------------------
PREPARING = "preparing"  # loading the model and the server's held-out data, the round-0 evaluation
WAITING = "waiting for nodes"
TRAINING = "training"
SECURE_TRAINING = "training and secure aggregation"
EVALUATING = "evaluating"
SAVING = "saving"  # the round's checkpoint and line


@dataclass(frozen=True)
class RoundProgress:
    """``progress.json``: where the server is inside the run, rewritten at each step of a round (round start,
    nodes sampled, training replies in, evaluation done). For watchers only (the dashboard, ``fedtune status``):
    nothing resumes from it, and it means nothing once the run is no longer running."""

    round: int = 0  # the round under way (0: preparing, before round 1)
    planned_rounds: int | None = None
    phase: str = PREPARING
    secure_aggregation: bool = False
    nodes_connected: int | None = None
    nodes_asked: int | None = None
    nodes_replied: int | None = None  # training replies (known once the training exchange is over)
    round_started: float | None = None  # wall clock (time.time())
    phase_started: float | None = None
    timeout: float | None = None  # seconds this phase waits for nodes (fed.round-timeout; fed.node-wait-timeout)
    updated: float | None = None
    majority_baseline: dict | None = None  # known from the start; summary.json has it only at the end

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, m: Mapping) -> RoundProgress:
        return cls(round=_int(m.get("round")), planned_rounds=_int(m.get("planned_rounds"), None),
                   phase=_str(m.get("phase"), PREPARING), secure_aggregation=bool(m.get("secure_aggregation")),
                   nodes_connected=_int(m.get("nodes_connected"), None), nodes_asked=_int(m.get("nodes_asked"), None),
                   nodes_replied=_int(m.get("nodes_replied"), None), round_started=_num(m.get("round_started")),
                   phase_started=_num(m.get("phase_started")), timeout=_num(m.get("timeout")),
                   updated=_num(m.get("updated")), majority_baseline=_dict(m.get("majority_baseline")))


# -- the run's summary ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunPrivacy:
    """The run's privacy settings and per-node figures (``nodes``: ``monitoring.node_privacy``)."""

    dp: bool | None = None
    mechanism: str | None = None
    accountant: str | None = None  # as the nodes reported it (monitoring.run_accountant)
    max_grad_norm: float | None = None
    target_epsilon: float | None = None
    eval_budget: float | None = None
    secure_aggregation: bool | None = None
    nodes: dict[str, dict] = field(default_factory=dict)

    def to_json(self, *, nodes: bool = True) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "nodes"}
        return {**out, "nodes": dict(self.nodes)} if nodes else out

    @classmethod
    def from_json(cls, m: Mapping | None) -> RunPrivacy | None:
        if not isinstance(m, Mapping):
            return None
        return cls(dp=m.get("dp"), mechanism=_str(m.get("mechanism")), accountant=_str(m.get("accountant")),
                   max_grad_norm=_num(m.get("max_grad_norm")), target_epsilon=_num(m.get("target_epsilon")),
                   eval_budget=_num(m.get("eval_budget")), secure_aggregation=m.get("secure_aggregation"),
                   nodes={str(k): dict(v) for k, v in _map(m.get("nodes")).items() if isinstance(v, Mapping)})


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: how the run ended, the final (and round-0) evaluation, the last federated evaluation
    (without its per-node answers) and the privacy figures; ``tuning``: added by ``fedtune tune`` to the run
    it chose."""

    status: str = ""
    rounds_completed: int = 0
    rounds_planned: int | None = None
    rounds_failed: tuple[int, ...] = ()
    seconds: float = 0.0
    final: dict[str, dict] | None = None  # {"val": ..., "test": ...} without the per-class table
    final_per_class: dict | None = None
    initial: dict[str, dict] | None = None  # round 0: the base model (initial.json)
    federated_eval: FederatedEval | None = None
    majority_baseline: dict | None = None
    class_weights: tuple[float, ...] | None = None
    warnings: tuple[str, ...] = ()
    privacy: RunPrivacy | None = None
    tuning: dict | None = None

    def __post_init__(self) -> None:
        _freeze(self, rounds_failed=tuple, warnings=tuple,
                class_weights=lambda w: tuple(w) if w is not None else None)

    @property
    def final_test(self) -> dict:
        return (self.final or {}).get("test") or {}

    @property
    def final_val(self) -> dict:
        return (self.final or {}).get("val") or {}

    def to_json(self) -> dict:
        out = {
            "status": self.status, "rounds_completed": self.rounds_completed, "rounds_planned": self.rounds_planned,
            "rounds_failed": list(self.rounds_failed), "seconds": self.seconds, "final": self.final,
            "final_per_class": self.final_per_class, "initial": self.initial,
            "federated_eval": self.federated_eval.to_json(per_node=False) if self.federated_eval else None,
            "majority_baseline": self.majority_baseline,
            "class_weights": list(self.class_weights) if self.class_weights is not None else None,
            "warnings": list(self.warnings), "privacy": self.privacy.to_json() if self.privacy else None,
        }
        if self.tuning is not None:
            out["tuning"] = self.tuning
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> RunSummary:
        weights = d.get("class_weights")
        failed = d.get("rounds_failed")
        return cls(status=str(d.get("status") or ""), rounds_completed=_int(d.get("rounds_completed")),
                   rounds_planned=_int(d.get("rounds_planned"), None),
                   rounds_failed=tuple(int(k) for k in failed) if isinstance(failed, list) else (),
                   seconds=_num(d.get("seconds")) or 0.0, final=_dict(d.get("final")),
                   final_per_class=_dict(d.get("final_per_class")), initial=_dict(d.get("initial")),
                   federated_eval=FederatedEval.from_json(d.get("federated_eval")),
                   majority_baseline=_dict(d.get("majority_baseline")),
                   class_weights=tuple(weights) if isinstance(weights, list) else None,
                   warnings=_strs(d.get("warnings")), privacy=RunPrivacy.from_json(d.get("privacy")),
                   tuning=_dict(d.get("tuning")))
