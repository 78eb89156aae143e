"""Flower ClientApp: unpack a message, call ``common``, pack the reply. Nothing else.

A simulated node (``partition-id`` in its node config) trains on its partition of
the job's data and keeps its ledger under the simulation's state root; an
organization's node uses its own ``--node-config`` (see ``client/node_config.py``),
whose privacy rules no job can override.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedtune.client import secure_node
from fedtune.client.node_config import NodeSettings, node_settings, simulated_settings
from fedtune.client.runtime import get_node
from fedtune.common.errors import BudgetExceededError, FedtuneError
from fedtune.common.privacy import accounting as privacy
from fedtune.common.training import adapter, aggregate
from fedtune.common.training.config import JobConfig, load_config
from fedtune.common.training.evaluate import LM_LOSS_CLIP
from fedtune.common.training.node import EvalAnswer, answer_evaluation, train_round
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

log = logging.getLogger(__name__)


def _info(settings: NodeSettings, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"node": settings.name, "status": status, "reason": reason[:2000],
                         "accountant": settings.policy.accountant})


def _refusal(msg: Message, settings: NodeSettings, err: FedtuneError) -> Message:
    """A refusal the server records: budget (for good), an unsafe secure-aggregation request, or an error."""
    status = ("refused" if isinstance(err, BudgetExceededError) else
              "unsafe" if isinstance(err, secure_node.sa.SecAggError) else "error")
    log.error("node %s %s round: %s", settings.name, status, err)
    return Message(RecordDict({"info": _info(settings, status, str(err))}), reply_to=msg)


def make_client_app(settings: dict | None = None, *, sim_state_root: str | Path | None = None) -> ClientApp:
    """A ClientApp for the job in ``settings`` (None: the run config Flower passes).

    ``sim_state_root``: where simulated nodes keep their state (ledgers); a simulation driver
    passes its run directory's ``nodes/``. Never a path from a message.
    """
    app = ClientApp()

    def _setup(context: Context) -> tuple[JobConfig, NodeSettings]:
        cfg = load_config(settings if settings is not None else dict(context.run_config))
        nc = context.node_config
        if "partition-id" in nc:  # a virtual node of a simulation (a real SuperNode never has this key)
            root = Path(sim_state_root) if sim_state_root else Path(cfg.fed.run_dir or "runs/flwr-simulation") / "nodes"
            ns = simulated_settings(cfg, int(nc["partition-id"]), int(nc["num-partitions"]), root)
        else:
            ns = node_settings(nc, context.node_id)
        return ns.apply(cfg), ns

    def _fail(msg: Message, context: Context, err: FedtuneError) -> Message:
        name = str(context.node_config.get("name", context.node_id))
        log.error("node %s refused a request: %s", name, err)
        return Message(RecordDict({"info": ConfigRecord({"node": name, "status": "error",
                                                         "reason": str(err)[:2000]})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            cfg, ns = _setup(context)
        except FedtuneError as err:
            return _fail(msg, context, err)
        conf = msg.content["config"]
        job, rnd = str(conf["job"]), int(conf["server-round"])
        sec = msg.content.config_records.get("secagg")
        try:
            keys = params = None
            if sec is not None:  # refuse an unsafe or reused round before spending any privacy budget on it
                keys, params = secure_node.check_train(context, ns, job, sec)
                if params.round != rnd:
                    raise secure_node.sa.SecAggError("the round number differs between the job and secure "
                                                     "aggregation", "refusing")
            node = get_node(cfg, ns)
            if not cfg.privacy.enabled and ns.partition is None:  # simulations print it once in the driver
                privacy.warn_dp_off(job)
            received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            update, metrics = node_train(node, received, job=job, round_=rnd)
            if keys is not None:
                masked, wire = secure_node.mask(context, ns, keys, params, update, metrics["weight"])
        except FedtuneError as err:
            return _refusal(msg, ns, err)
        if keys is None:
            return Message(RecordDict({"update": ArrayRecord({k: Array(v) for k, v in update.items()}),
                                       "metrics": MetricRecord(metrics), "info": _info(ns, "ok")}), reply_to=msg)
        # under secure aggregation: nothing derived from the update, and not the weight, in the clear
        metrics.pop("weight")
        return Message(RecordDict({"masked": ArrayRecord({"masked": Array(masked)}),
                                   "secagg": ConfigRecord(wire), "metrics": MetricRecord(metrics),
                                   "info": _info(ns, "ok")}), reply_to=msg)

    def _secagg_query(msg: Message, context: Context, step) -> Message:
        try:
            _, ns = _setup(context)
        except FedtuneError as err:
            return _fail(msg, context, err)
        try:
            rec = msg.content.config_records.get("secagg")
            if rec is None:
                raise secure_node.sa.SecAggError("the request carried no secure-aggregation record", "refusing")
            out = step(context, ns, rec)
        except FedtuneError as err:
            return _refusal(msg, ns, err)
        return Message(RecordDict({"secagg": ConfigRecord(out), "info": _info(ns, "ok")}), reply_to=msg)

    @app.query("secagg_keys")
    def secagg_keys(msg: Message, context: Context) -> Message:
        return _secagg_query(msg, context, secure_node.advertise)

    @app.query("secagg_join")
    def secagg_join(msg: Message, context: Context) -> Message:
        return _secagg_query(msg, context, secure_node.join)

    @app.query("secagg_consistency")
    def secagg_consistency(msg: Message, context: Context) -> Message:
        return _secagg_query(msg, context, secure_node.consistency)

    @app.query("secagg_unmask")
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return _secagg_query(msg, context, secure_node.reveal)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            cfg, ns = _setup(context)
        except FedtuneError as err:
            return _fail(msg, context, err)
        conf = msg.content["config"]
        try:
            node = get_node(cfg, ns)
            adapter.unpack(node.lora.model, {k: a.numpy() for k, a in msg.content["arrays"].items()},
                           ffa=node.lora.ffa)
            answer = answer_evaluation(node, job=str(conf["job"]), round=int(conf["server-round"]))
        except FedtuneError as err:
            return _refusal(msg, ns, err)
        return Message(RecordDict({"metrics": MetricRecord(eval_metrics(answer, cfg.model.task)),
                                   "info": _info(ns, "ok")}), reply_to=msg)

    return app


def node_train(node, received: dict, *, job: str, round_: int) -> tuple[dict, dict]:
    """Train one round from the received global adapter; return (update, metrics) to send."""
    t0 = time.perf_counter()
    result = train_round(node, job=job, round=round_, initial=received)
    update = aggregate.update(result.arrays, received)
    metrics = {"weight": result.weight, "train-loss": result.stats.mean_loss,
               "epsilon": result.epsilon_spent, "noise-multiplier": result.noise_multiplier,
               "sample-rate": result.sample_rate, "delta": result.delta, "steps": result.steps,
               "max-epsilon": node.policy.max_epsilon, "seconds": time.perf_counter() - t0}
    return update, metrics


def eval_metrics(answer: EvalAnswer, task: str) -> dict:
    """A noised evaluation answer as reply metrics (counts, never an exact record count)."""
    a, b = answer.counts
    counts = {"correct": a, "wrong": b} if task == "seq-cls" else {"records": a, "loss-sum": b * LM_LOSS_CLIP}
    return {**counts, "noise-std": answer.noise_std, "epsilon": answer.epsilon_spent}


app = make_client_app()
