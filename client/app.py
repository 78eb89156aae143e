"""Flower ClientApp: unpack a message, call the node's core, pack the reply. Nothing else.

A simulated node (``partition-id`` in its node config) trains on its partition of the
job's data and keeps its ledger under the simulation's state root; an organization's
node uses its own ``--node-config`` (see ``client/node_config.py``), whose privacy rules
no job can override. What a reply carries is built by the typed values of
``fedtune.common.training.wire``; requests are opened and replies built by ``fedtune.envelope``
(the one place a message type or record name is spelled).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedtune import envelope
from fedtune.client import secure_node
from fedtune.client.node_config import NodeSettings, node_settings, simulated_settings
from fedtune.client.runtime import MAX_PARSED_SETTINGS, get_node
from fedtune.common.errors import BudgetExceededError, FedtuneError, SecAggError, UnsafeMessage
from fedtune.common.privacy import accounting as privacy
from fedtune.common.training.config import JobConfig, from_run_config, load_config
from fedtune.common.training.node import answer_evaluation, check_received, receive, train_and_report
from fedtune.common.training.wire import EvalAnswer, NodeInfo, NodeRoundResult
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

# a Flower process (flwr run, a plain SuperNode, a SuperLink's ServerApp) never contacts the Hugging Face Hub: models
# load from local paths (every from_pretrained also passes local_files_only=True; this covers the libraries it calls)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger(__name__)
SIM_STATE_ENV = "FEDTUNE_SIM_STATE"  # where `flwr run` simulations keep virtual nodes' ledgers (never from a job)


def _reply(msg: Message, info: NodeInfo, result: dict | None = None, *, masked=None, secagg: dict | None = None
           ) -> Message:
    """A Flower reply from plain values: ``result`` is a ``to_record()`` dict (update arrays, metrics)."""
    return Message(envelope.reply(info, result=result, masked=masked, secagg=secagg), reply_to=msg)


def _refusal(msg: Message, settings: NodeSettings, err: FedtuneError) -> Message:
    """A refusal the server records: budget (for good), an unsafe secure-aggregation request, or an error."""
    status = ("refused" if isinstance(err, BudgetExceededError) else
              "unsafe" if isinstance(err, (SecAggError, UnsafeMessage)) else "error")
    log.error("node %s %s round: %s", settings.name, status, err)
    return _reply(msg, NodeInfo(settings.name, status, str(err), settings.policy.accountant))


def _frozen(values) -> tuple:
    """A hashable key of Flower's run or node config (scalar values; anything else by its repr)."""
    return tuple(sorted((str(k), v if isinstance(v, (str, int, float, bool)) or v is None else repr(v))
                        for k, v in dict(values).items()))


def make_client_app(settings: JobConfig | dict | None = None, *, sim_state_root: str | Path | None = None
                    ) -> ClientApp:
    """A ClientApp for the job in ``settings`` (a parsed config, flat settings, or None: the run config Flower
    passes; a simulation hands its parsed config, so no node parses it again).

    ``sim_state_root``: where simulated nodes keep their state (ledgers); a simulation driver
    passes its run directory's ``nodes/`` (``flwr run`` simulations: $FEDTUNE_SIM_STATE, default
    ``runs/flwr-simulation/nodes``). Never a path from a message or from the job.
    """
    app = ClientApp()
    parsed: dict[tuple, tuple[JobConfig, NodeSettings]] = {}  # parsed once per app instance, job and node

    def _setup(context: Context) -> tuple[JobConfig, NodeSettings]:
        given = isinstance(settings, JobConfig)
        raw = {} if given else settings if settings is not None else from_run_config(context.run_config)
        nc = context.node_config
        key = (_frozen(raw), _frozen(nc), context.node_id)
        if key not in parsed:
            cfg = settings if given else load_config(raw)
            if "partition-id" in nc:  # a virtual node of a simulation (a real SuperNode never has this key)
                root = Path(sim_state_root or os.environ.get(SIM_STATE_ENV, "runs/flwr-simulation/nodes"))
                ns = simulated_settings(cfg, int(nc["partition-id"]), int(nc["num-partitions"]), root)
            else:
                ns = node_settings(nc, context.node_id)
            if len(parsed) > MAX_PARSED_SETTINGS:
                parsed.clear()
            parsed[key] = (ns.apply(cfg), ns)
        return parsed[key]

    def _handle(msg: Message, context: Context, work) -> Message:
        """Set up (config, node settings), run ``work``; any user-fixable problem becomes a refusal reply."""
        try:
            cfg, ns = _setup(context)
        except FedtuneError as err:
            name = str(context.node_config.get("name", context.node_id))
            log.error("node %s refused a request: %s", name, err)
            return _reply(msg, NodeInfo(name, "error", str(err)))
        try:
            return work(cfg, ns)
        except FedtuneError as err:
            return _refusal(msg, ns, err)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        def work(cfg: JobConfig, ns: NodeSettings) -> Message:
            task = envelope.received_task(msg.content)
            sec = envelope.secagg_record(msg.content)
            if sec is None and ns.require_secagg:  # before anything is read or spent
                raise SecAggError(
                    "this node requires secure aggregation (node config require-secure-aggregation=on) and the "
                    "server's train message carries none: its update and weight would leave in the clear",
                    "run the job with fed.secure-aggregation=true; refusing before reading a record")
            keys = params = None
            if sec is not None:  # refuse an unsafe or reused round before spending any privacy budget on it
                keys, params = secure_node.check_train(context, ns, task.job, sec)
                if params.round != task.round:
                    raise SecAggError("the round number differs between the job and secure aggregation", "refusing")
            received = envelope.received_arrays(msg.content)
            check_received(received, ns.policy)  # before any record is read: a refusal on the message alone
            node = get_node(cfg, ns)
            if not cfg.privacy.enabled and ns.partition is None:  # simulations print it once in the driver
                privacy.warn_dp_off(task.job)
            result: NodeRoundResult = train_and_report(node, received, job=task.job, round=task.round,
                                                       class_weights=task.class_weights)
            info = NodeInfo(ns.name, "ok", accountant=ns.policy.accountant)
            if keys is None:
                return _reply(msg, info, result.to_record())
            # under secure aggregation: nothing derived from the update, and not the weight, in the clear
            masked, wire = secure_node.mask(context, ns, keys, params, result.update, result.weight)
            return _reply(msg, info, result.to_record(secure=True), masked=masked, secagg=wire)

        return _handle(msg, context, work)

    def _secagg_query(msg: Message, context: Context, step) -> Message:
        def work(cfg: JobConfig, ns: NodeSettings) -> Message:
            rec = envelope.secagg_record(msg.content)
            if rec is None:
                raise SecAggError("the request carried no secure-aggregation record", "refusing")
            return _reply(msg, NodeInfo(ns.name, "ok", accountant=ns.policy.accountant),
                          secagg=step(context, ns, rec))

        return _handle(msg, context, work)

    def _register(action: str, step) -> None:
        @app.query(action)
        def handle(msg: Message, context: Context) -> Message:
            return _secagg_query(msg, context, step)

    @app.query(envelope.query_action(envelope.INFO))
    def info(msg: Message, context: Context) -> Message:
        """The node's name (a simulated node's partition name): configuration only, nothing from its records."""
        return _handle(msg, context, lambda cfg, ns: _reply(msg, NodeInfo(ns.name, "ok",
                                                                          accountant=ns.policy.accountant)))

    for message_type, step in ((envelope.SECAGG_KEYS, secure_node.advertise), (envelope.SECAGG_JOIN, secure_node.join),
                               (envelope.SECAGG_CONSISTENCY, secure_node.consistency),
                               (envelope.SECAGG_UNMASK, secure_node.reveal)):
        _register(envelope.query_action(message_type), step)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        def work(cfg: JobConfig, ns: NodeSettings) -> Message:
            task = envelope.received_task(msg.content)
            received = envelope.received_arrays(msg.content)
            check_received(received, ns.policy)
            node = get_node(cfg, ns)
            receive(node, received)
            answer: EvalAnswer = answer_evaluation(node, job=task.job, round=task.round, groups=task.groups)
            return _reply(msg, NodeInfo(ns.name, "ok", accountant=ns.policy.accountant),
                          answer.to_record(cfg.model.task))

        return _handle(msg, context, work)

    return app


app = make_client_app()
