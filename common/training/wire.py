"""What travels between the server and a node for a round: typed values whose methods are the only
place a wire key is spelled.

``to_record`` / ``from_record`` give and take plain dicts (numbers, strings, numpy arrays); the Flower
glue (client/app.py, server/messages.py) only moves them in and out of Flower's records. A decoder
never trusts what it reads: a missing or mistyped value becomes ``None`` (figures) or a
:class:`FedtuneError` naming the field (instructions a node acts on). ``figures`` are the same
values under the names the run directory stores (``rounds.jsonl``, ``summary.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
from fedtune.common.errors import FedtuneError
from fedtune.common.training.evaluate import LM_LOSS_CLIP
from fedtune.common.training.fairness import MAX_GROUP_NAME, MAX_GROUPS

# field name -> wire key (Flower record keys use dashes; the run directory uses the field names)
# No training loss and no training time: the first is a function of the node's records with no noise on it, the
# second depends on them too; both stay in the node's log (the server times its own rounds).
_RESULT_KEYS = {"weight": "weight", "epsilon": "epsilon", "max_epsilon": "max-epsilon",
                "delta": "delta", "noise_multiplier": "noise-multiplier", "sample_rate": "sample-rate",
                "steps": "steps"}


def _number(v) -> float | None:
    """A finite number from the network, else None (a NaN or a string is no figure)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class RoundTask:
    """The server's instruction for one round: the job it belongs to and the round number."""

    job: str
    round: int
    class_weights: tuple[float, ...] | None = None  # per label, from the server's own data (the node checks bounds)
    groups: tuple[str, ...] = ()  # an evaluation's audit groups (the server's; fedtune.common.training.fairness)

    def to_record(self) -> dict:
        rec = {"job": self.job, "server-round": self.round}
        if self.class_weights is not None:
            rec["class-weights"] = [float(w) for w in self.class_weights]
        if self.groups:
            rec["audit-groups"] = list(self.groups)
        return rec

    @classmethod
    def from_record(cls, rec: Mapping) -> RoundTask:
        job, rnd = rec.get("job"), rec.get("server-round")
        if not isinstance(job, str) or not job or len(job) > 200:
            raise FedtuneError("the server's request names no valid job", "a fedtune server always sends one; refusing")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise FedtuneError(f"the server's request has an invalid round number {rnd!r}", "refusing")
        weights = rec.get("class-weights")
        if weights is not None:
            if not isinstance(weights, list) or not weights or len(weights) > 10_000 or \
                    any(_number(w) is None for w in weights):
                raise FedtuneError("the server's request has malformed class weights", "refusing")
            weights = tuple(float(w) for w in weights)
        groups = rec.get("audit-groups", [])
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS or len(set(map(str, groups))) != len(groups) \
                or any(not isinstance(g, str) or not g or len(g) > MAX_GROUP_NAME for g in groups):
            raise FedtuneError(f"the server's request has malformed audit groups (at most {MAX_GROUPS} distinct "
                               f"names of 1-{MAX_GROUP_NAME} characters)", "refusing")
        return cls(job=job, round=rnd, class_weights=weights, groups=tuple(groups))


@dataclass(frozen=True)
class NodeRoundResult:
    """A node's round result: its update (trained minus received tensors), FedAvg weight and figures.

    Under secure aggregation the update and the weight travel masked (client/secure_node.py), so
    ``to_record(secure=True)`` carries only the figures."""

    update: dict[str, np.ndarray]
    weight: int | None
    epsilon: float | None = None  # the node's total spend on its data source after this round
    max_epsilon: float | None = None  # the node's ceiling
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None

    def figures(self) -> dict:
        """The figures under the run directory's names (no update)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "update"}

    def to_record(self, *, secure: bool = False) -> dict:
        metrics = {_RESULT_KEYS[k]: v for k, v in self.figures().items()
                   if v is not None and not (secure and k == "weight")}
        return {"metrics": metrics} if secure else {"update": self.update, "metrics": metrics}

    @classmethod
    def from_record(cls, metrics: Mapping, update: Mapping[str, np.ndarray] | None = None) -> NodeRoundResult:
        vals = {k: _number(metrics.get(w)) for k, w in _RESULT_KEYS.items()}
        for k in ("weight", "steps"):
            vals[k] = int(vals[k]) if vals[k] is not None else None
        return cls(update=dict(update or {}), **vals)


@dataclass(frozen=True)
class EvalAnswer:
    """A noised federated-evaluation answer: counts plus Gaussian noise, never exact.

    ``counts``: seq-cls (correct, wrong); causal-lm (records, clipped loss sum / ``LM_LOSS_CLIP``).
    ``cells``: a fairness audit's noised per-group confusion histogram (seq-cls, when the server listed
    groups and the node has a group column); ``counts`` are then sums of its cells, and ``noise_std`` is
    the noise on each cell."""

    counts: tuple[float, float]
    noise_std: float
    epsilon: float | None
    cells: tuple[float, ...] = ()

    def figures(self, task: str) -> dict:
        a, b = self.counts
        counts = {"correct": a, "wrong": b} if task == "seq-cls" else {"records": a, "loss_sum": b * LM_LOSS_CLIP}
        return {**counts, "noise_std": self.noise_std, "epsilon": self.epsilon}

    def to_record(self, task: str) -> dict:
        metrics = {k.replace("_", "-"): v for k, v in self.figures(task).items() if v is not None}
        if self.cells and task == "seq-cls":
            metrics["audit-cells"] = [float(c) for c in self.cells]
        return {"metrics": metrics}

    @classmethod
    def from_record(cls, metrics: Mapping, task: str) -> EvalAnswer:
        if task == "seq-cls":
            a, b = _number(metrics.get("correct")), _number(metrics.get("wrong"))
        else:
            a, loss = _number(metrics.get("records")), _number(metrics.get("loss-sum"))
            b = None if loss is None else loss / LM_LOSS_CLIP
        cells = metrics.get("audit-cells") if task == "seq-cls" else None
        if not isinstance(cells, list) or len(cells) > 1_000_000 or any(_number(c) is None for c in cells):
            cells = []  # a malformed histogram is no audit (the counts still count)
        return cls(counts=(a or 0.0, b or 0.0), noise_std=_number(metrics.get("noise-std")) or 0.0,
                   epsilon=_number(metrics.get("epsilon")), cells=tuple(float(c) for c in cells))


@dataclass(frozen=True)
class NodeInfo:
    """Every reply's status line: who answered, ``ok`` / ``refused`` / ``unsafe`` / ``error``, and why."""

    name: str
    status: str = "ok"
    reason: str = ""
    accountant: str | None = None

    def to_record(self) -> dict:
        return {k: v for k, v in {"node": self.name, "status": self.status, "reason": self.reason[:2000],
                                  "accountant": self.accountant}.items() if v is not None}

    @classmethod
    def from_record(cls, rec: Mapping, default_name: str) -> NodeInfo:
        acc = str(rec.get("accountant", ""))
        return cls(name=str(rec.get("node", default_name))[:200], status=str(rec.get("status", "ok"))[:20],
                   reason=str(rec.get("reason", ""))[:2000], accountant=acc if acc in ("pld", "rdp") else None)

