"""Flower ClientApp: unpack a message, call ``common``, pack the reply. Nothing else.

A simulated node (``partition-id`` in its node config) trains on its partition of
the job's data and keeps its ledger in the run directory; an organization's
node uses its own ``--node-config`` (see ``client/node_config.py``).
"""

from __future__ import annotations

import logging
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node_config import NodeSettings, node_settings
from client.runtime import get_node
from common import adapter, aggregate
from common.config import load_config
from common.errors import BudgetExceededError, FedtuneError

log = logging.getLogger(__name__)


def _info(settings: NodeSettings, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"node": settings.name, "status": status, "reason": reason[:2000]})


def _refusal(msg: Message, settings: NodeSettings, err: FedtuneError) -> Message:
    status = "refused" if isinstance(err, BudgetExceededError) else "error"
    log.error("node %s %s round: %s", settings.name, status, err)
    return Message(RecordDict({"info": _info(settings, status, str(err))}), reply_to=msg)


def make_client_app(settings: dict | None = None) -> ClientApp:
    """A ClientApp for the job in ``settings`` (None: the run config Flower passes)."""
    app = ClientApp()

    def _setup(msg: Message, context: Context):
        cfg = load_config(settings if settings is not None else dict(context.run_config))
        ns = node_settings(context.node_config, context.node_id, cfg, msg.content["config"])
        return cfg, ns

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, ns = _setup(msg, context)
        conf = msg.content["config"]
        try:
            node = get_node(cfg, ns)
            received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            result = node_train(node, received, job=str(conf["job"]), round_=int(conf["server-round"]))
        except FedtuneError as err:
            return _refusal(msg, ns, err)
        update, metrics = result
        return Message(RecordDict({"update": ArrayRecord({k: Array(v) for k, v in update.items()}),
                                   "metrics": MetricRecord(metrics), "info": _info(ns, "ok")}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, ns = _setup(msg, context)
        try:
            node = get_node(cfg, ns)
            adapter.unpack(node.lora.model, {k: a.numpy() for k, a in msg.content["arrays"].items()},
                           ffa=node.lora.ffa)
            from common.node import evaluate_split

            m = evaluate_split(node, "test")
        except FedtuneError as err:
            return _refusal(msg, ns, err)
        metrics = {"num-examples": int(m["n"]), "loss": float(m.get("loss", 0.0))}
        if "accuracy" in m:
            metrics.update({"accuracy": m["accuracy"], "macro-f1": m["macro_f1"]})
        return Message(RecordDict({"metrics": MetricRecord(metrics), "info": _info(ns, "ok")}), reply_to=msg)

    return app


def node_train(node, received: dict, *, job: str, round_: int) -> tuple[dict, dict]:
    """Train one round from the received global adapter; return (update, metrics) to send."""
    from common.node import train_round

    t0 = time.perf_counter()
    result = train_round(node, job=job, round=round_, initial=received)
    update = aggregate.update(result.arrays, received)
    metrics = {"num-examples": result.num_examples, "train-loss": result.stats.mean_loss,
               "epsilon": result.epsilon_spent, "noise-multiplier": result.noise_multiplier,
               "sample-rate": result.sample_rate, "delta": result.delta, "steps": result.stats.steps,
               "seconds": time.perf_counter() - t0}
    return update, metrics


app = make_client_app()
