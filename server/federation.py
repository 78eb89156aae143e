"""The server's round loop: sample nodes, aggregate, evaluate, record everything in the run directory.

One round, as data: pick nodes -> the aggregator sends the global adapter and
turns replies into a new one (or fails the round, model unchanged) -> server-side
and federated evaluation -> one line in ``rounds.jsonl`` and a checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

import numpy as np
from fedtune.common.operations.monitoring import node_privacy, run_accountant
from fedtune.common.operations.records import (EVALUATING, PREPARING, SAVING, SECURE_TRAINING, TRAINING, WAITING,
                                               Failure, FederatedEval, NodeFigures, RoundProgress, RunPrivacy)
from fedtune.common.operations.rundir import RoundRecord, RunDir, RunSummary
from fedtune.common.operations.tracking import Tracker
from fedtune.common.training import adapter, builder
from fedtune.common.training.config import JobConfig
from fedtune.common.training.evaluate import evaluate, pool_answers
from fedtune.common.training.fairness import audit_groups, pool_cells
from fedtune.common.training.imbalance import class_weights, learned_nothing, majority_baseline, what_to_try
from fedtune.common.training.node import with_features
from fedtune.common.training.wire import EvalAnswer, NodeRoundResult, RoundTask
from fedtune.server.aggregation import Aggregator
from fedtune import envelope
from fedtune.server.messages import Pending, collect, exchange, post, wait_for_nodes
from flwr.serverapp import Grid

log = logging.getLogger(__name__)
FAILED_NODE_SITS_OUT = 1  # rounds a node whose reply failed (error, unsafe) is not asked; a refusal: for good


class ServerModel:
    """The global adapter on the server: a LoRA model built from the shared seed, and its held-out data."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.splits = builder.load_records(cfg)
        self.lora = builder.build_model(cfg, self.splits.labels)
        tokens = builder.tokenized(cfg, self.lora, self.splits, "val", "test")
        (self.val, self.test), self.net = with_features(cfg, self.lora, tokens)  # the head on features, or the model
        held = self.splits.val.labels + self.splits.test.labels  # the server's own records, not any node's
        cls = cfg.model.task == "seq-cls"
        self.class_weights = class_weights(held, self.splits.labels, cfg.train.class_weighting) if cls else None
        self.majority = majority_baseline(self.splits.test.labels, self.splits.labels) if cls else None
        # the groups nodes are asked to audit: the server's own (a node never names its own groups)
        self.audit_groups = audit_groups(self.splits.val.groups + self.splits.test.groups) if cls else ()

    def initial_arrays(self) -> dict[str, np.ndarray]:
        return adapter.pack(self.lora.model, ffa=self.lora.ffa, head_only=self.lora.head_only)

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        adapter.unpack(self.lora.model, arrays, ffa=self.lora.ffa, head_only=self.lora.head_only)

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict:
        self.load(arrays)
        kw = dict(task=self.cfg.model.task, labels=self.splits.labels, batch_size=self.cfg.train.eval_batch_size)
        out = {"val": evaluate(self.net, self.val, groups=self.splits.val.groups, **kw),
               "test": evaluate(self.net, self.test, groups=self.splits.test.groups, **kw)}
        m = self.cfg.model
        if self.splits.test.responses and m.eval_generate:  # instruction tuning: answers scored against references
            from fedtune.common.training.generate import generation_metrics

            out["test"].update(generation_metrics(self.lora.model, self.lora.tokenizer, self.splits.test,
                                                  n=m.eval_generate, max_new_tokens=m.max_new_tokens,
                                                  max_prompt_tokens=m.max_length))
        return out

    def save(self, arrays: dict[str, np.ndarray], directory) -> None:
        self.load(arrays)
        adapter.save_adapter(self.lora.model, directory)


def _metric(ev: dict | None, name: str) -> float | None:
    if not ev or "val" not in ev:
        return None
    return ev["val"].get(name)


class Federation:
    """Runs a job's rounds on a Flower grid and writes its run directory."""

    def __init__(self, cfg: JobConfig, run_dir: RunDir, aggregator: Aggregator, *, out: Callable[[str], None] = print,
                 simulated: bool = False) -> None:
        self.cfg, self.rd, self.agg, self.out, self.simulated = cfg, run_dir, aggregator, out, simulated
        self.names: dict[int, str] = {}  # node id -> the name it reports (displayed only)
        self.name_asked: set[int] = set()  # simulation: nodes asked their name (once, answered or not)
        self.benched: dict[int, float] = {}  # node id -> first round it may be asked again
        self.class_weights: list[float] | None = None
        self.majority: dict | None = None
        self.audit_groups: tuple[str, ...] = ()
        self.labels: list[str] = []
        self._live: dict = {}  # progress.json's fields for the round under way
        # fed.tracking: a missing library or an MLflow store that does not open fails here, before the run
        self.tracker = Tracker(cfg.to_flat(), run_dir.path if run_dir is not None else None, out=out)

    def run(self, grid: Grid) -> dict:
        """Run the job's rounds; returns the run's summary as ``summary.json`` holds it."""
        try:
            return self._run(grid)
        except BaseException:
            self.tracker.fail()  # the tracked run ends FAILED (the run directory says where it stopped)
            raise

    def _run(self, grid: Grid) -> dict:
        cfg, f = self.cfg, self.cfg.fed
        kind = "simulation" if self.simulated else "deployment"
        self.rd.create(config=cfg.to_flat(), planned_rounds=cfg.train.rounds, resume=f.resume, kind=kind)
        self.out(f"fedtune server: run directory {self.rd.path}")
        self.tracker.start(kind=kind, rounds=self.rd.rounds())  # a resumed run: the rounds not logged yet too
        self._progress(round=0, phase=PREPARING)
        server = ServerModel(cfg)
        self.class_weights, self.majority = server.class_weights, server.majority
        self.audit_groups, self.labels = server.audit_groups, server.splits.labels
        if server.majority:
            m = server.majority
            self.out(f"majority-class baseline on the server's test split: accuracy {m['accuracy']:.4f}, macro-F1 "
                     f"{m['macro_f1']:.4f} (always {m['label']!r}); the model has to beat it")
        if server.class_weights:
            self.out("class-weighted loss (train.class-weighting=" + cfg.train.class_weighting + ", from the server's "
                     "held-out labels): " + ", ".join(f"{lab} {w:.2f}" for lab, w in
                                                       zip(server.splits.labels, server.class_weights, strict=True)))
        global_arrays, start = server.initial_arrays(), 1
        if f.resume:
            done, ckpt = self.rd.resume_point()
            if ckpt is not None:
                full = adapter.read_adapter_file(ckpt)
                global_arrays = {k: full[k] for k in global_arrays}
            start = done + 1
            self.out(f"resuming after round {done} (from {ckpt or 'the initial adapter'})")
        ev0 = server.evaluate(global_arrays) if f.server_eval and start == 1 else None
        if ev0:  # the model before any round (LoRA starts as a no-op: the base model), kept for the report
            self.rd.write_initial(_compact(ev0))
            if "accuracy" in ev0["val"]:
                self.out(f"round 0: val macro-F1 {ev0['val']['macro_f1']:.4f} accuracy {ev0['val']['accuracy']:.4f}")
            else:
                self.out(f"round 0 (the base model): {_lm_figures(ev0)}")
        best, since_best, status = _metric(ev0, f.early_stop_metric), 0, "finished"
        ev = ev0
        for rnd in range(start, cfg.train.rounds + 1):
            record, new_arrays, ev = self._round(grid, server, rnd, global_arrays)
            if new_arrays is not None:
                global_arrays = new_arrays
                server.save(global_arrays, self.rd.checkpoint(rnd))  # checkpoint before the round line
            self.rd.append_round(record)
            self.tracker.log_round(record)
            self.out(_progress_line(record, cfg.train.rounds))
            if self.rd.stop_requested():
                status = "stopped"
                self.out(f"stopped by request after round {rnd} (resume with fed.resume=true)")
                break
            score = _metric(ev, f.early_stop_metric)
            if score is not None and f.early_stop_patience:
                better = best is None or (score < best if f.early_stop_metric == "loss" else score > best)
                best, since_best = (score, 0) if better else (best, since_best + 1)
                if since_best >= f.early_stop_patience:
                    status = "stopped-early"
                    self.out(f"early stop: no {f.early_stop_metric} improvement for {since_best} rounds")
                    break
        server.save(global_arrays, self.rd.final_adapter)
        final = server.evaluate(global_arrays) if f.server_eval else None
        summary = self._summary(final, status)
        self.rd.write_summary(summary)
        self.rd.set_status(status)
        self.tracker.finish(summary, status=status)
        self.out(f"done ({status}); final adapter in {self.rd.final_adapter}")
        for w in summary.warnings:
            self.out(f"WARNING: {w}")
        return summary.to_json()

    # -- one round ------------------------------------------------------------
    def _round(self, grid: Grid, server: ServerModel, rnd: int,
               global_arrays: dict) -> tuple[RoundRecord, dict | None, dict]:
        cfg, f = self.cfg, self.cfg.fed
        t0, started = time.perf_counter(), time.time()
        self._progress(round=rnd, phase=WAITING, round_started=started, timeout=f.node_wait_timeout)
        first = not self.names
        connected = wait_for_nodes(grid, wanted=f.num_nodes if first else f.min_nodes, minimum=f.min_nodes,
                                   timeout=f.node_wait_timeout, on_count=lambda n: self._progress(nodes_connected=n))
        # nodes that refused (spent budget: it never comes back) or failed last round are not asked again
        # (failed ones skip one round), unless too few would be left
        eligible = [n for n in connected if self.benched.get(n, 0) <= rnd]
        if len(eligible) < f.min_nodes:
            eligible = connected
        k = min(len(eligible), max(f.min_nodes, math.ceil(f.fraction_train * len(eligible))))
        # python's sampler: node ids are 64-bit unsigned and numpy would turn mixed ones into floats
        asked = sorted(random.Random(f"{cfg.train.seed}-{rnd}").sample(self._in_order(grid, eligible), k))
        conf = RoundTask(job=self.rd.path.name, round=rnd, class_weights=self.class_weights).to_record()
        self._progress(phase=SECURE_TRAINING if self.agg.secure else TRAINING, nodes_connected=len(connected),
                       nodes_asked=len(asked), timeout=f.round_timeout)
        if first:
            self.out(f"round {rnd}/{cfg.train.rounds}: asking {len(asked)} nodes (on its first message each node "
                     "loads the model and prepares its records" + (", computing their features once: the encoder is "
                     "frozen" if cfg.lora.head_only and cfg.train.cache_features else "") + ") ...")
        t_agg = time.perf_counter()
        outcome = self.agg.run_round(grid, server_round=rnd, node_ids=asked, global_arrays=global_arrays,
                                     config=conf, names=self.names)
        timing = {**(outcome.extra.pop("timing", None) or {"train": round(time.perf_counter() - t_agg, 3)})}
        for r in outcome.replies:
            self.names[r.node_id] = r.name
            if r.status == "refused":
                self.benched[r.node_id] = math.inf
            elif r.status in ("error", "unsafe"):
                self.benched[r.node_id] = rnd + 1 + FAILED_NODE_SITS_OUT
        self._progress(phase=EVALUATING, nodes_replied=sum(1 for r in outcome.replies if r.ok))
        new = outcome.new_arrays
        arrays = new if new is not None else global_arrays
        # the nodes evaluate while the server does: neither waits for the other (in a simulation they share cores)
        pending = self._post_federated_eval(grid, rnd, arrays, connected)
        t_ev = time.perf_counter()
        ev = server.evaluate(arrays) if f.server_eval else {}
        timing["server_eval"] = round(time.perf_counter() - t_ev, 3)
        t_ev = time.perf_counter()
        fed_ev = self._collect_federated_eval(grid, pending)
        timing["federated_eval_wait"] = round(time.perf_counter() - t_ev, 3)  # after the server's own evaluation
        ok = [r for r in outcome.replies if r.ok]
        # parsed once by the aggregator (a key set-up failure never trained: no figures)
        results = {r.node_id: r.result or NodeRoundResult(update={}, weight=None) for r in outcome.replies}
        fed = FederatedEval.from_json(fed_ev)
        eps = {self.key(r.node_id): results[r.node_id].epsilon for r in ok}
        for key, a in (fed.per_node if fed else {}).items():  # a node's spend after its last release
            if a.epsilon is not None:
                eps[key] = max(eps.get(key) or 0.0, a.epsilon)
        record = RoundRecord(
            round=rnd, status="ok" if new is not None else "failed", reason=outcome.reason,
            started=started, seconds=round(time.perf_counter() - t0, 3), timing=timing,
            aggregation=self.agg.name, secure_aggregation=self.agg.secure,
            nodes_connected=len(connected), nodes_asked=len(asked), nodes_replied=len(ok),
            nodes_benched=tuple(sorted(self.names.get(n, str(n)) for n in connected if n not in asked)),
            failures=tuple(Failure(node=r.name, key=self.key(r.node_id), status=r.status, reason=r.reason)
                           for r in outcome.replies if not r.ok)
            + tuple(Failure(node=r.name, key=self.key(r.node_id), status=r.status, reason=r.reason,
                            stage="after training") for r in outcome.later),
            epsilon_per_node=eps, epsilon_max=max((e for e in eps.values() if e is not None), default=None),
            bytes_sent=outcome.bytes_sent, bytes_received=outcome.bytes_received,
            exchanges=outcome.exchanges, server_eval=_compact(ev), federated_eval=fed,
            server_per_class=(ev or {}).get("test", {}).get("per_class"),
            secagg=outcome.extra or None,
            per_node={self.key(r.node_id): NodeFigures.of(r.name, r.status, r.accountant, results[r.node_id].figures())
                      for r in outcome.replies},
        )
        self._progress(phase=SAVING)
        return record, new, ev

    def _progress(self, **fields) -> None:
        """Rewrite progress.json with ``fields`` (a new ``round`` starts afresh) for the dashboard and
        ``fedtune status``; a write that fails is logged and never fails the round."""
        now = time.time()
        if "round" in fields:
            self._live = {}
        if "phase" in fields and fields["phase"] != self._live.get("phase"):
            fields["phase_started"] = now
        self._live.update(fields)
        try:
            self.rd.write_progress(RoundProgress(planned_rounds=self.cfg.train.rounds, updated=now,
                                                 secure_aggregation=self.agg.secure, majority_baseline=self.majority,
                                                 **self._live))
        except Exception as e:  # noqa: BLE001 - a watcher's file: the round goes on without it
            log.warning("progress.json not written (%s: %s)", e.__class__.__name__, e)

    def _in_order(self, grid: Grid, nodes: list[int]) -> list[int]:
        """The nodes a seeded sample draws from, in an order the same settings reproduce: in a simulation by the
        partition names the virtual nodes report (Flower draws fresh node ids each run; asked once per node, on
        a message that reads nothing but the node's configuration), so two runs of one job sample the same
        cohorts; in a deployment by node id (names are self-declared there)."""
        if not self.simulated:
            return sorted(nodes)
        unknown = [n for n in nodes if n not in self.names and n not in self.name_asked]
        if unknown:  # a node that does not answer is not waited for again
            self.name_asked.update(unknown)
            exchange(grid, node_ids=unknown, message_type=envelope.INFO, content=envelope.request(),
                     timeout=self.cfg.fed.round_timeout, group="info", names=self.names)
        return sorted(nodes, key=lambda n: (self.names.get(n, ""), n))

    def _post_federated_eval(self, grid: Grid, rnd: int, arrays: dict, connected: list[int]) -> Pending | None:
        f = self.cfg.fed
        if f.fraction_evaluate <= 0 or self.cfg.privacy.eval_budget <= 0 or not connected:
            return None
        k = max(1, math.ceil(f.fraction_evaluate * len(connected)))
        nodes = sorted(random.Random(f"{self.cfg.train.seed}-{rnd}-eval").sample(self._in_order(grid, connected), k))
        conf = RoundTask(job=self.rd.path.name, round=rnd, groups=self.audit_groups).to_record()
        return post(grid, node_ids=nodes, message_type=envelope.EVALUATE, timeout=f.round_timeout,
                    group=f"eval-{rnd}", content=envelope.request(arrays=arrays, task=conf))

    def _collect_federated_eval(self, grid: Grid, pending: Pending | None) -> dict | None:
        if pending is None:
            return None
        replies = collect(grid, pending, names=self.names)
        task = self.cfg.model.task
        parsed = {self.key(r.node_id): (r, EvalAnswer.from_record(r.metrics, task)) for r in replies if r.ok}
        pooled = pool_answers({key: a for key, (_, a) in parsed.items()}, task=task,
                              failed=[r.name for r in replies if not r.ok],
                              about={key: {"name": r.name, "accountant": r.accountant}  # its own accountant
                                     for key, (r, _) in parsed.items()})
        if self.audit_groups:  # nodes' noised per-group histograms, summed, then audited
            audit = pool_cells([a.cells for _, a in parsed.values() if a.cells], self.audit_groups, self.labels)
            if audit is not None:
                pooled["fairness"] = audit
        return pooled

    def key(self, node_id: int) -> str:
        """The key a node's figures are recorded under: its node id (names are self-declared and may collide);
        in a simulation, where node ids are drawn afresh every run, its partition's name (unique there)."""
        return self.names.get(node_id, str(node_id)) if self.simulated else str(node_id)

    def _summary(self, final: dict | None, status: str) -> RunSummary:
        rounds = self.rd.rounds()
        cfg = self.cfg
        last_fed = next((r.federated_eval for r in reversed(rounds) if r.federated_eval), None)
        nothing = learned_nothing((final or {}).get("test"), self.majority)
        return RunSummary(
            majority_baseline=self.majority, class_weights=self.class_weights,
            warnings=(f"{nothing}. {what_to_try(bool(self.class_weights), cfg.lora.head_only, cfg.model.pooling)}",)
            if nothing else (),
            status=status, rounds_completed=len(rounds), rounds_planned=cfg.train.rounds,
            rounds_failed=tuple(r.round for r in rounds if not r.ok),
            final=_compact(final) if final else None,
            initial=self.rd.initial(),
            final_per_class=(final or {}).get("test", {}).get("per_class"),
            federated_eval=last_fed,
            privacy=RunPrivacy(dp=cfg.privacy.enabled, mechanism="DP-SGD (Opacus), sample-level, per node dataset",
                               accountant=run_accountant(rounds, default=cfg.privacy.accountant),
                               max_grad_norm=cfg.privacy.max_grad_norm, target_epsilon=cfg.privacy.target_epsilon,
                               eval_budget=cfg.privacy.eval_budget, secure_aggregation=self.agg.secure,
                               nodes=node_privacy(rounds)),
            seconds=sum(r.seconds for r in rounds),
        )


def _compact(ev: dict | None) -> dict | None:
    """Evaluation figures without the per-class table (kept in summary.json only)."""
    if not ev:
        return None
    return {split: {k: v for k, v in m.items() if k != "per_class"} for split, m in ev.items()}


def _lm_figures(ev: dict) -> str:
    t = ev["test"]
    return (f"test response perplexity {t['perplexity']:.2f}"
            + (f", ROUGE-L {t['rouge_l']:.4f} ({t['generated']} generated)" if t.get("rouge_l") is not None else ""))


def _progress_line(rec: RoundRecord, planned: int) -> str:
    parts = [f"round {rec.round}/{planned}: {rec.nodes_replied}/{rec.nodes_asked} nodes"]
    if not rec.ok:
        parts.append(f"FAILED ({rec.reason})")
    se = rec.server_eval or {}
    if "test" in se and "perplexity" in se["test"]:
        parts.append(_lm_figures(se))
    if "val" in se and "accuracy" in se["val"]:
        parts.append(f"val macro-F1 {se['val']['macro_f1']:.4f} acc {se['val']['accuracy']:.4f}, test macro-F1 "
                     f"{se['test']['macro_f1']:.4f} acc {se['test']['accuracy']:.4f}")
    fe = rec.federated_eval
    if fe and fe.worst_node_accuracy is not None:
        parts.append(f"nodes acc {fe.accuracy:.3f} (worst {fe.worst_node_accuracy:.3f})")
    if rec.epsilon_max is not None:
        parts.append(f"max epsilon {rec.epsilon_max:.2f}")
    for fl in rec.failures:
        parts.append(f"[{fl.node} {fl.status}: {fl.reason[:120]}]")
    parts.append(f"{rec.seconds:.1f}s")
    return ", ".join(parts)
