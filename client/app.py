"""Flower ClientApp: unpack a message, call ``common``, pack the reply. Nothing else.

A simulated node (``partition-id`` in its node config) trains on its partition of
the job's data and keeps its ledger in the run directory; an organization's
node uses its own ``--node-config`` (see ``client/node_config.py``).
"""

from __future__ import annotations

import logging
import time

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client import secure_node
from client.node_config import NodeSettings, node_settings
from client.runtime import get_node
from common import adapter, aggregate, privacy
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
        conf = msg.content.config_records.get("config") or msg.content.config_records.get("secagg") or {}
        ns = node_settings(context.node_config, context.node_id, cfg, conf)
        return cfg, ns

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, ns = _setup(msg, context)
        conf = msg.content["config"]
        job, rnd = str(conf["job"]), int(conf["server-round"])
        secure = "epoch" in conf
        try:
            keys = None
            if secure:  # refuse a reused round before spending any privacy budget on it
                keys = secure_node.load_keys(context)
                secure_node.check_round(keys, ns.state_dir, job, rnd)
            node = get_node(cfg, ns)
            if not cfg.privacy.enabled and ns.partition is None:  # simulations print it once in the driver
                privacy.warn_dp_off(job)
            received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            update, metrics = node_train(node, received, job=job, round_=rnd)
            if keys is not None:
                masked, shares = secure_node.mask_update(context, keys, conf, update, metrics["num-examples"])
                secure_node.record_round(ns.state_dir, job, rnd)
        except FedtuneError as err:
            return _refusal(msg, ns, err)
        if keys is None:
            return Message(RecordDict({"update": ArrayRecord({k: Array(v) for k, v in update.items()}),
                                       "metrics": MetricRecord(metrics), "info": _info(ns, "ok")}), reply_to=msg)
        # under secure aggregation: nothing derived from the update, and not the record count, in the clear
        metrics.pop("num-examples")
        return Message(RecordDict({"masked": ArrayRecord({"masked": Array(masked)}),
                                   "secagg": ConfigRecord(shares), "metrics": MetricRecord(metrics),
                                   "info": _info(ns, "ok")}), reply_to=msg)

    def _secagg_query(msg: Message, context: Context, step) -> Message:
        _, ns = _setup(msg, context)
        try:
            out = step(context, msg.content["secagg"])
        except FedtuneError as err:
            return _refusal(msg, ns, err)
        return Message(RecordDict({"secagg": ConfigRecord(out), "info": _info(ns, "ok")}), reply_to=msg)

    @app.query("secagg_keys")
    def secagg_keys(msg: Message, context: Context) -> Message:
        return _secagg_query(msg, context, lambda ctx, rec: secure_node.advertise(
            ctx, epoch=int(rec["epoch"]), index=int(rec["index"])))

    @app.query("secagg_join")
    def secagg_join(msg: Message, context: Context) -> Message:
        return _secagg_query(msg, context, secure_node.join)

    @app.query("secagg_unmask")
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return _secagg_query(msg, context, secure_node.reveal)

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
               "max-epsilon": node.ledger.max_epsilon,
               "seconds": time.perf_counter() - t0}
    return update, metrics


app = make_client_app()
