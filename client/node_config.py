"""What a node is told by its own organization (``--node-config``), parsed once.

An organization's SuperNode is started with e.g.::

    flower-supernode ... --node-config 'name="hospital-a" data-path="/data/notes.csv" source="notes"
        state-dir="/var/lib/fedtune" max-epsilon=8'

Everything that touches privacy is the node's: the data source its budget belongs to
(``source``; a new name starts a new budget, which only the organization can do), the
ceiling (``max-epsilon``), the bounds on what the server may send (``max-received-abs``,
``max-received-norm``), ``delta``, the accountant, whether it answers federated
evaluations, the columns it reads (``group-column``: whether it joins the fairness audit, with noised
per-group answers at no extra privacy cost) and the task its data is for. The server's run config
can ask a node to spend *less* (``privacy.target-epsilon``) but never more; a job that
asks for other columns is ignored with a log line, one for another task is refused.
A simulated node (``partition-id`` set by Flower) gets its rules from the job's settings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.common.privacy import accounting as privacy
from fedtune.common.privacy.ledger import DEFAULT_SOURCE
from fedtune.common.secagg.limits import MIN_COHORT, MIN_THRESHOLD
from fedtune.common.secagg.protocol import NodeRules, load_identity_key, load_roster
from fedtune.common.training.config import TASKS, JobConfig, parse_bool
from fedtune.common.training.node import NodePolicy

log = logging.getLogger(__name__)

KEYS = {"name": str, "data-path": str, "source": str, "state-dir": str, "max-epsilon": float, "delta": float,
        "accountant": str, "evaluate": str, "task": str, "text-column": str, "label-column": str,
        "response-column": str, "messages-column": str, "group-column": str,
        "identity-key": str, "roster": str, "approved-peers": str, "secagg-min-organizations": int,
        "secagg-min-cohort": int, "secagg-min-threshold": int,
        "secagg-max-weight": int, "approved-apps": str, "max-received-abs": float, "max-received-norm": float,
        "allow-shared-content": str, "require-secure-aggregation": str}
EXPECTED_ON_OFF = "expected on or off (or true/false, yes/no, 1/0)"  # what parse_bool reads, as the job config does


@dataclass(frozen=True)
class NodeSettings:
    name: str
    state_dir: Path
    policy: NodePolicy
    data_path: str | None = None  # None: the job's data (simulated nodes only)
    task: str | None = None  # None: whatever the job says (simulated nodes)
    text_column: str | None = None
    label_column: str | None = None
    response_column: str | None = None  # instruction tuning: this node's response column ("" = plain text)
    messages_column: str | None = None  # instruction tuning from chat records
    group_column: str | None = None  # the fairness audit of this node's held-out records ("" = not audited)
    partition: tuple[int, int] | None = None  # (index, count) for a simulated node
    secagg_rules: NodeRules = field(default_factory=NodeRules)
    identity_key_path: str | None = None  # this node's OpenSSH private key (its SuperNode authentication key)
    roster_path: str | None = None  # the peers this organization approved: their public keys, by node name
    any_peer: bool = False  # approved-peers="*": aggregate with whoever the server proposes (trials only)
    require_secagg: bool = False  # refuse a train message without secure aggregation (deployed nodes: default on)

    @property
    def max_epsilon(self) -> float:
        return self.policy.max_epsilon

    def identity_key(self):
        """The node's long-term key, to sign its secure-aggregation keys (None: not configured)."""
        return load_identity_key(self.identity_key_path) if self.identity_key_path else None

    def roster(self) -> dict | None:
        """The approved peers' public keys every peer's secure-aggregation keys are checked against (None: none)."""
        return load_roster(self.roster_path) if self.roster_path else None

    def apply(self, cfg: JobConfig) -> JobConfig:
        """The job as this node runs it: its own columns; a job for another task is refused."""
        if self.task is not None and cfg.model.task != self.task:
            raise FedtuneError(
                f"the job asks for model.task={cfg.model.task}, but this node's data is for {self.task} "
                "(node config `task`)", "run a job for this node's task, or leave this node out of the run")
        changes = {}
        for key, mine in (("data.text-column", self.text_column), ("data.label-column", self.label_column),
                          ("data.response-column", self.response_column),
                          ("data.messages-column", self.messages_column), ("data.group-column", self.group_column)):
            if mine is None:
                continue
            asked = getattr(cfg.data, key.partition(".")[2].replace("-", "_"))
            if asked != mine:
                log.info("node %s: ignoring %s=%r from the job; this node reads column %r (node config)",
                         self.name, key, asked, mine)
                changes[key] = mine
        return cfg.replace(**changes) if changes else cfg


def simulated_settings(cfg: JobConfig, pid: int, count: int, state_root: Path) -> NodeSettings:
    """A simulated organization: node ``pid`` of ``count``, its rules from the job's settings."""
    policy = NodePolicy(source=f"simulated-node-{pid}", max_epsilon=cfg.sim.node_max_epsilon,
                        delta=cfg.privacy.delta or privacy.DEFAULT_DELTA, accountant=cfg.privacy.accountant,
                        warn_large_jobs=False)
    return NodeSettings(name=f"node-{pid}", state_dir=state_root / f"node-{pid}", policy=policy, partition=(pid, count),
                        require_secagg=cfg.fed.secure_aggregation)  # a simulated node follows the job


def node_settings(node_config: Mapping[str, Any], node_id: int) -> NodeSettings:
    """Parse an organization's node config into NodeSettings (every problem reported at once)."""
    problems = [f"node config {k!r}: unknown key (known: {', '.join(KEYS)})" for k in node_config if k not in KEYS]
    values: dict[str, Any] = {}
    for k, typ in KEYS.items():
        if k in node_config:
            try:
                values[k] = typ(node_config[k])
            except (TypeError, ValueError):
                problems.append(f"node config {k!r}: expected {typ.__name__}, got {node_config[k]!r}")
    if "max-epsilon" not in values:
        problems.append("node config 'max-epsilon': required (this organization's privacy ceiling, e.g. 8)")
    elif not values["max-epsilon"] > 0 or math.isnan(values["max-epsilon"]):
        problems.append(f"node config 'max-epsilon': expected > 0, got {values['max-epsilon']}")
    delta = values.get("delta", privacy.DEFAULT_DELTA)
    if not 0 < delta <= 1e-3:
        problems.append(f"node config 'delta': expected 0 < delta <= 1e-3 (and at most 1/N for N records), "
                        f"got {delta}")
    accountant = values.get("accountant", "pld")
    if accountant not in privacy.ACCOUNTANTS:
        problems.append(f"node config 'accountant': expected one of {', '.join(privacy.ACCOUNTANTS)}, got "
                        f"{accountant!r}")
    evaluate = parse_bool(values.get("evaluate", "on"))
    if evaluate is None:
        problems.append(f"node config 'evaluate': {EXPECTED_ON_OFF}, got {values['evaluate']!r}")
    task = values.get("task", "seq-cls")
    if task not in TASKS:
        problems.append(f"node config 'task': expected one of {', '.join(TASKS)}, got {task!r}")
    data_path = values.get("data-path")
    if not data_path:  # never a path from the job: the server does not choose which file a node reads
        problems.append("node config 'data-path': required (the file of this organization's records)")
    source = values.get("source") or DEFAULT_SOURCE  # one budget per node unless the organization names sources
    require = parse_bool(values.get("require-secure-aggregation", "on"))
    if require is None:
        problems.append(f"node config 'require-secure-aggregation': {EXPECTED_ON_OFF}, got "
                        f"{values['require-secure-aggregation']!r}")
    shared = parse_bool(values.get("allow-shared-content", "off"))
    if shared is None:
        problems.append(f"node config 'allow-shared-content': {EXPECTED_ON_OFF}, got "
                        f"{values['allow-shared-content']!r}")
    rules = NodeRules(min_cohort=values.get("secagg-min-cohort", NodeRules.min_cohort),
                      min_threshold=values.get("secagg-min-threshold", NodeRules.min_threshold),
                      max_weight=values.get("secagg-max-weight", NodeRules.max_weight),
                      min_organizations=values.get("secagg-min-organizations", NodeRules.min_organizations))
    if rules.min_organizations < 1:
        problems.append(f"node config 'secagg-min-organizations': expected >= 1, got {rules.min_organizations}")
    if "roster" in values:  # its name from before: the operator's list. It is the organization's own now
        if "approved-peers" in values:
            problems.append("node config 'roster' and 'approved-peers' name the same thing: keep 'approved-peers'")
        else:
            values["approved-peers"] = values.pop("roster")
    any_peer = values.get("approved-peers", "").strip() == "*"
    if any_peer:
        values.pop("approved-peers")
    if rules.min_cohort < MIN_COHORT:
        problems.append(f"node config 'secagg-min-cohort': expected >= {MIN_COHORT} (with 2 nodes each learns the "
                        f"other's update from the sum), got {rules.min_cohort}")
    if rules.min_threshold < MIN_THRESHOLD:
        problems.append(f"node config 'secagg-min-threshold': expected >= {MIN_THRESHOLD}, got {rules.min_threshold}")
    if rules.max_weight < 1:
        problems.append(f"node config 'secagg-max-weight': expected >= 1, got {rules.max_weight}")
    for key in ("identity-key", "approved-peers"):
        if key in values and not Path(values[key]).expanduser().exists():
            problems.append(f"node config {key!r}: {values[key]} does not exist")
    if "approved-peers" in values and "identity-key" not in values:
        problems.append("node config 'approved-peers' needs 'identity-key': the node signs its keys with the one (so "
                        "its peers can check them) and checks its peers' against the other")
    bounds = {k: values.get(k, getattr(NodePolicy, k.replace("-", "_"))) for k in ("max-received-abs",
                                                                                  "max-received-norm")}
    for k, v in bounds.items():
        if not 0 < v < math.inf:
            problems.append(f"node config {k!r}: expected a finite number > 0, got {v}")
    if problems:
        raise ConfigError(problems)
    policy = NodePolicy(source=source, max_epsilon=values["max-epsilon"], delta=delta, accountant=accountant,
                        evaluate=bool(evaluate), max_received_abs=bounds["max-received-abs"],
                        max_received_norm=bounds["max-received-norm"], shared_content_ok=bool(shared))
    return NodeSettings(name=values.get("name") or str(node_id),
                        state_dir=Path(values.get("state-dir") or Path.home() / ".fedtune" / "node").expanduser(),
                        policy=policy, data_path=data_path, task=task,
                        text_column=values.get("text-column", "text"),
                        label_column=values.get("label-column", "label"),
                        response_column=values.get("response-column", ""),
                        messages_column=values.get("messages-column", ""),
                        group_column=values.get("group-column", ""), secagg_rules=rules,
                        identity_key_path=str(Path(values["identity-key"]).expanduser()) if "identity-key" in values
                        else None,
                        roster_path=str(Path(values["approved-peers"]).expanduser()) if "approved-peers" in values
                        else None, any_peer=any_peer,
                        require_secagg=bool(require))
