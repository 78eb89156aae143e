"""What a node is told by its own organization (``--node-config``), parsed once.

An organization's SuperNode is started with e.g.::

    flower-supernode ... --node-config 'name="hospital-a" data-path="/data/notes.csv" state-dir="/var/lib/fedtune" max-epsilon=8'

The server's run config can ask a node to spend *less* (``privacy.target-epsilon``)
but never raise ``max-epsilon``: that ceiling is only read from here. A simulated
node (``partition-id`` set by Flower) gets its settings from the job's ``sim.*``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import JobConfig
from common.errors import ConfigError

KEYS = {"name": str, "data-path": str, "state-dir": str, "max-epsilon": float, "delta": float,
        "text-column": str, "label-column": str}


@dataclass(frozen=True)
class NodeSettings:
    name: str
    state_dir: Path
    max_epsilon: float
    delta: float = 0.0  # 0 = automatic
    data_path: str | None = None  # None: the job's data.path
    text_column: str | None = None
    label_column: str | None = None
    partition: tuple[int, int] | None = None  # (index, count) for a simulated node


def node_settings(node_config: Mapping[str, Any], node_id: int, cfg: JobConfig,
                  server_config: Mapping[str, Any]) -> NodeSettings:
    """Parse a node's own config (or a simulated node's) into NodeSettings."""
    if "partition-id" in node_config:
        pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
        run_dir = Path(str(server_config["run-dir"]))
        return NodeSettings(name=f"node-{pid}", state_dir=run_dir / "nodes" / f"node-{pid}",
                            max_epsilon=cfg.sim.node_max_epsilon, partition=(pid, count))
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
    if problems:
        raise ConfigError(problems)
    return NodeSettings(name=values.get("name") or str(node_id),
                        state_dir=Path(values.get("state-dir") or Path.home() / ".fedtune" / "node").expanduser(),
                        max_epsilon=values["max-epsilon"], delta=values.get("delta", 0.0),
                        data_path=values.get("data-path"), text_column=values.get("text-column"),
                        label_column=values.get("label-column"))
