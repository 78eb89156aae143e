"""Experiment tracking: a run's settings, per-round figures, per-node epsilon, report and final adapter, logged to
MLflow and TensorBoard, where researchers already look (``fed.tracking``: empty = off, ``mlflow``, ``tensorboard``
or ``mlflow,tensorboard``).

What is logged is what the server already holds, read from the typed run records (nothing private: no node's
update, records, loss or data size):

- params: the job's flat settings (``JobConfig.to_flat()``, as ``config.json`` holds them);
- per round (step = round number), :func:`round_metrics`: the server's evaluation on its own held-out data
  (``val/*``, ``test/*``), the nodes' pooled, noised federated-evaluation estimates (``nodes/*``), each node's
  epsilon (``epsilon/<node>``) and the largest (``epsilon_max``), and the round's own figures (``round/*``: ok,
  seconds, bytes sent and received, nodes asked and replied);
- at the end, :func:`summary_metrics` (``final/*``: the final evaluation and each node's epsilon) and, in MLflow,
  ``summary.json`` and the final adapter (the global model every node receives) as artifacts; ``report.md`` with its
  plots when the report is written (:func:`log_report`), and ``fedtune baselines``' rows as child runs
  (:func:`log_baselines`).

MLflow: by default a local SQLite store beside the run directory (``sqlite:///<runs>/mlflow.db``, artifacts in
``<runs>/mlartifacts/``; see them with ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``), or the store
at ``fed.tracking-uri``; experiment ``fed.tracking-experiment`` (default ``fedtune``); one MLflow run per run
directory, found again by its key (tag ``fedtune.run_key``) when the run resumes or its report is added. MLflow's
usage telemetry is turned off (``MLFLOW_DISABLE_TELEMETRY``, unless set). TensorBoard: event files in
``<run>/tensorboard/`` (``tensorboard --logdir runs``).

Both libraries are the optional extra ``tracking`` (``pip install -e ".[tracking]"``), imported here only, and only
when a job turns tracking on; a missing one is reported before the run starts. A tracker that fails in the middle
of a run is warned about and the run goes on (``rounds.jsonl`` holds every figure; a resumed run catches up).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtune.common.errors import FedtuneError
from fedtune.common.operations.records import RoundRecord, RunSummary
from fedtune.common.operations.rundir import RunDir

TRACKERS = ("mlflow", "tensorboard")
DEFAULT_EXPERIMENT = "fedtune"
INSTALL = 'pip install -e ".[tracking]"'
SERVER_FIGURES = ("accuracy", "macro_f1", "loss", "perplexity", "rouge_l")  # of the server's evaluation, per split
RUN_KEY_TAG = "fedtune.run_key"  # finds a run directory's MLflow run again (resume, report, baselines)
MLFLOW_BATCH = 100  # log_batch's smallest per-kind limit (params, tags; metrics allow 1000)
MAX_PARAM_LENGTH = 6000  # MLflow's longest param value


# -- what is logged ------------------------------------------------------------------------------------------------
def parse(value: str) -> tuple[str, ...]:
    """The trackers a ``fed.tracking`` value names, in :data:`TRACKERS` order (unknown names are config problems)."""
    names = {s.strip().lower() for s in str(value or "").split(",") if s.strip()}
    return tuple(t for t in TRACKERS if t in names)


def unknown(value: str) -> list[str]:
    """Names in a ``fed.tracking`` value that are no tracker."""
    return [s.strip() for s in str(value or "").split(",") if s.strip() and s.strip().lower() not in TRACKERS]


def _key(name: str) -> str:
    """A metric name both trackers accept."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def _node(key: str) -> str:
    """A node's key (any string) as one part of a metric name: no "/", which would nest it."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", key)


def _put(out: dict[str, float], name: str, v: Any) -> None:
    if isinstance(v, bool):
        v = float(v)
    if isinstance(v, (int, float)):
        out[_key(name)] = float(v)


def round_metrics(rec: RoundRecord) -> dict[str, float]:
    """One round's logged figures, by name: the server's own, as ``rounds.jsonl`` holds them (absent ones left out)."""
    out: dict[str, float] = {}
    for split, ev in (("val", rec.server_val), ("test", rec.server_test)):
        for k in SERVER_FIGURES:
            _put(out, f"{split}/{k}", ev.get(k))
    fe = rec.federated_eval
    if fe is not None:  # the nodes' noised answers, pooled: estimates
        _put(out, "nodes/accuracy", fe.accuracy)
        _put(out, "nodes/worst_accuracy", fe.worst_node_accuracy)
        _put(out, "nodes/loss", fe.loss)
    for node, eps in sorted(rec.epsilon_per_node.items()):
        _put(out, f"epsilon/{_node(node)}", eps)
    _put(out, "epsilon_max", rec.epsilon_max)
    _put(out, "round/ok", rec.ok)
    for k in ("seconds", "bytes_sent", "bytes_received", "nodes_asked", "nodes_replied"):
        _put(out, f"round/{k}", getattr(rec, k))
    return out


def summary_metrics(summary: RunSummary) -> dict[str, float]:
    """The run's final figures (``summary.json``): the final evaluation and each node's epsilon over the run."""
    out: dict[str, float] = {}
    for split, ev in (("val", summary.final_val), ("test", summary.final_test)):
        for k in SERVER_FIGURES:
            _put(out, f"final/{split}/{k}", ev.get(k))
    for node, p in sorted((summary.privacy.nodes if summary.privacy else {}).items()):
        _put(out, f"final/epsilon/{_node(node)}", p.get("epsilon"))
    _put(out, "final/rounds_completed", summary.rounds_completed)
    _put(out, "final/seconds", summary.seconds)
    return out


def run_tags(run_dir: Path, kind: str) -> dict[str, str]:
    """The MLflow tags of a run directory's run (its name is the directory's)."""
    return {RUN_KEY_TAG: run_key(run_dir), "fedtune.kind": kind, "fedtune.run_dir": str(run_dir)}


def run_key(run_dir: str | Path) -> str:
    """A run directory's key in MLflow (its absolute path, hashed: a filter-safe string)."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:32]


# -- the libraries, imported when a job turns tracking on ----------------------------------------------------------
def _missing(name: str, e: ImportError) -> FedtuneError:
    return FedtuneError(f"fed.tracking names {name}, which is not installed ({e})",
                        f"install fedtune's tracking extra: {INSTALL} (or turn tracking off: fed.tracking=)")


def _import_mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports leave this machine
    try:
        import mlflow.entities
        import mlflow.exceptions
        import mlflow.tracking
    except ImportError as e:
        raise _missing("mlflow", e) from None
    return mlflow


def _import_tensorboard():
    try:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as e:
        raise _missing("tensorboard", e) from None
    return event_pb2, hparams_pb, scalar_pb, EventFileWriter


def default_uri(run_dir: str | Path) -> str:
    """The MLflow store when ``fed.tracking-uri`` is empty: a SQLite file beside the run directory."""
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db').as_posix()}"


def _artifact_root(uri: str) -> str | None:
    """Where a new experiment in a local SQLite store keeps artifacts: beside the database (MLflow's own default is
    relative to the working directory); None for other stores (the server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").resolve().as_uri()


class _Mlflow:
    """One run directory's MLflow run."""

    def __init__(self, flat: Mapping[str, Any], run_dir: Path) -> None:
        mlflow = _import_mlflow()
        self.entities, self.error = mlflow.entities, mlflow.exceptions.MlflowException
        self.run_dir = run_dir
        self.uri = str(flat.get("fed.tracking-uri") or "") or default_uri(run_dir)
        self.experiment_name = str(flat.get("fed.tracking-experiment") or "") or DEFAULT_EXPERIMENT
        self.run_id: str | None = None
        try:
            if self.uri.startswith("sqlite:///"):
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self.client = mlflow.tracking.MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment()
        except Exception as e:  # a store that cannot be opened: before the run starts
            raise FedtuneError(f"cannot open the MLflow tracking store {self.uri}: {e.__class__.__name__}: {e}",
                               "check fed.tracking-uri (e.g. sqlite:///runs/mlflow.db or http://HOST:5000 of a "
                               "running `mlflow server`), or leave it empty for a local store") from None

    def _experiment(self) -> str:
        c, name = self.client, self.experiment_name
        exp = c.get_experiment_by_name(name)
        if exp is None:
            try:
                return c.create_experiment(name, artifact_location=_artifact_root(self.uri))
            except self.error:  # created meanwhile by another run
                exp = c.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def find(self):
        """This run directory's MLflow run, or None."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = "
                                       f"'{run_key(self.run_dir)}'", max_results=1)
        return runs[0] if runs else None

    def start(self, flat: Mapping[str, Any], kind: str, rounds: Sequence[RoundRecord]) -> None:
        e = self.entities
        run = self.find()
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=self.run_dir.name,
                                         tags=run_tags(self.run_dir, kind))
            logged, last = {}, 0
        else:  # a resumed run: its settings are logged (only train.rounds may have grown), its rounds up to `last`
            self.client.update_run(run.info.run_id, status="RUNNING")
            logged = run.data.params
            last = max((m.step for m in self.client.get_metric_history(run.info.run_id, "round/seconds")), default=0)
        self.run_id = run.info.run_id
        params = [e.Param(k, _param(v)) for k, v in flat.items() if k not in logged]
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])
        for rec in rounds:
            if rec.round > last:
                self.log_round(rec)

    def _metrics(self, values: dict[str, float], step: int, millis: int) -> None:
        metrics = [self.entities.Metric(k, v, millis, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_round(self, rec: RoundRecord) -> None:
        self._metrics(round_metrics(rec), rec.round, _millis(rec))

    def finish(self, summary: RunSummary, status: str, files: Sequence[Path]) -> None:
        self._metrics(summary_metrics(summary), summary.rounds_completed, int(time.time() * 1000))
        self.client.set_tag(self.run_id, "fedtune.status", status)
        log_files(self.client, self.run_id, files)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED")


def log_files(client, run_id: str, files: Sequence[Path]) -> None:
    """Files and directories (each under its own name) as a run's artifacts; missing ones are skipped."""
    for p in files:
        if p.is_dir():
            client.log_artifacts(run_id, str(p), artifact_path=p.name)
        elif p.is_file():
            client.log_artifact(run_id, str(p))


def _param(v: Any) -> str:
    s = str(v)
    return s if len(s) <= MAX_PARAM_LENGTH else s[:MAX_PARAM_LENGTH - 3] + "..."


def _millis(rec: RoundRecord) -> int:
    """When the round ended (its start plus its seconds), in ms: a round logged late keeps its own time."""
    return int(((rec.started or time.time()) + rec.seconds) * 1000)


class _TensorBoard:
    """One run directory's TensorBoard event files (``<run>/tensorboard/``)."""

    def __init__(self, run_dir: Path) -> None:
        self.event_pb2, self.hparams_pb, self.scalar_pb, self.writer_class = _import_tensorboard()
        self.dir = RunDir(run_dir).tensorboard_dir
        self.writer = None

    def _last_round(self) -> int | None:
        """The last round already in the event files (None: no event file yet)."""
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        files = sorted(self.dir.glob("events.out.tfevents.*")) if self.dir.is_dir() else []
        if not files:
            return None
        steps = [ev.step for f in files for ev in LegacyEventFileLoader(str(f)).Load()
                 if any(v.tag == "round/seconds" for v in ev.summary.value)]
        return max(steps, default=0)

    def start(self, flat: Mapping[str, Any], rounds: Sequence[RoundRecord]) -> None:
        last = self._last_round()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = self.writer_class(str(self.dir))
        if last is None:  # the settings, once (TensorBoard's HParams dashboard)
            self._write(0, self.hparams_pb({k: _hparam(v) for k, v in flat.items()}, start_time_secs=time.time()))
        for rec in rounds:
            if rec.round > (last or 0):
                self.log_round(rec)

    def _write(self, step: int, summary, wall_time: float | None = None) -> None:
        self.writer.add_event(self.event_pb2.Event(wall_time=wall_time or time.time(), step=step, summary=summary))

    def _scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        for k, v in values.items():
            self._write(step, self.scalar_pb(k, v), wall_time)
        self.writer.flush()

    def log_round(self, rec: RoundRecord) -> None:
        self._scalars(round_metrics(rec), rec.round, _millis(rec) / 1000)

    def finish(self, summary: RunSummary) -> None:
        self._scalars(summary_metrics(summary), summary.rounds_completed, time.time())
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _hparam(v: Any) -> bool | float | str:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return str(v)


# -- one run -----------------------------------------------------------------------------------------------------
class Tracker:
    """A run directory's trackers, as its job's settings (``flat``) name them; with tracking off every method does
    nothing. Built before the run starts: a missing library or an unreachable MLflow store raises
    :class:`FedtuneError` here."""

    def __init__(self, flat: Mapping[str, Any], run_dir: str | Path | None, *,
                 out: Callable[[str], None] = print) -> None:
        self.flat, self.out = dict(flat), out
        self.names = parse(str(self.flat.get("fed.tracking") or ""))
        if self.names and run_dir is None:
            raise ValueError("tracking needs the run directory")  # a bug, not a user error
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        self.mlflow = _Mlflow(self.flat, self.run_dir) if "mlflow" in self.names else None
        self.tensorboard = _TensorBoard(self.run_dir) if "tensorboard" in self.names else None

    def _guard(self, name: str, what: str, fn: Callable[[], None]) -> None:
        """A tracker failing mid-run does not stop the run: warned once, then that tracker is off for the rest of
        the run (an unreachable tracking server would otherwise stall every round in its retries)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure of a tracker's library
            setattr(self, name, None)
            self.out(f"WARNING: tracking: {name} could not log {what} ({e.__class__.__name__}: {e}); it is off for "
                     f"the rest of this run, which goes on: rounds.jsonl holds every figure (a resumed run catches up)")

    def start(self, *, kind: str, rounds: Sequence[RoundRecord] = ()) -> None:
        """Open the run (or reopen a resumed one): its settings, tags, and ``rounds`` not logged yet."""
        if self.mlflow is not None:
            try:
                self.mlflow.start(self.flat, kind, rounds)
            except Exception as e:
                raise FedtuneError(f"cannot start the MLflow run in {self.mlflow.uri}: {e.__class__.__name__}: {e}",
                                   "check fed.tracking-uri, or turn tracking off (fed.tracking=)") from None
            self.out(f"tracking: MLflow run {self.mlflow.run_id} in experiment {self.mlflow.experiment_name!r} "
                     f"({self.mlflow.uri})")
        if self.tensorboard is not None:
            try:
                self.tensorboard.start(self.flat, rounds)
            except Exception as e:
                raise FedtuneError(f"cannot write TensorBoard events in {self.tensorboard.dir}: "
                                   f"{e.__class__.__name__}: {e}",
                                   "check that the run directory is writable, or turn tracking off "
                                   "(fed.tracking=)") from None
            self.out(f"tracking: TensorBoard events in {self.tensorboard.dir}")

    def log_round(self, rec: RoundRecord) -> None:
        if self.mlflow is not None:
            self._guard("mlflow", f"round {rec.round}", lambda: self.mlflow.log_round(rec))
        if self.tensorboard is not None:
            self._guard("tensorboard", f"round {rec.round}", lambda: self.tensorboard.log_round(rec))

    def finish(self, summary: RunSummary, *, status: str) -> None:
        """The final figures; in MLflow ``summary.json`` and the final adapter as artifacts; the run closed."""
        if self.mlflow is not None:
            rd = RunDir(self.run_dir)
            self._guard("mlflow", "the summary and adapter", lambda: self.mlflow.finish(
                summary, status, [rd.path / "summary.json", rd.final_adapter]))
        if self.tensorboard is not None:
            self._guard("tensorboard", "the summary", lambda: self.tensorboard.finish(summary))

    def fail(self) -> None:
        """The run ended with an error: MLflow marks it FAILED, TensorBoard's file is closed."""
        if self.mlflow is not None:
            self._guard("mlflow", "the failure", self.mlflow.fail)
        if self.tensorboard is not None:
            self._guard("tensorboard", "the failure", self.tensorboard.close)


def check(flat: Mapping[str, Any], run_dir: str | Path) -> None:
    """Raise :class:`FedtuneError` now if the job's trackers could not log (a library missing, a store that does not
    open): what a simulation calls before it starts its nodes."""
    Tracker(flat, run_dir, out=lambda s: None)


# -- after the run -------------------------------------------------------------------------------------------------
def _run_of(flat: Mapping[str, Any], run_dir: str | Path) -> _Mlflow | None:
    """The run directory's MLflow run, when its job tracks to MLflow and the run was logged."""
    if "mlflow" not in parse(str(flat.get("fed.tracking") or "")):
        return None
    ml = _Mlflow(flat, Path(run_dir).resolve())
    run = ml.find()
    if run is None:
        return None
    ml.run_id = run.info.run_id
    return ml


def _after_the_run(what: str, fn: Callable[[], Any], default: Any = None) -> Any:
    """A tracking step after the run directory is complete: a failing store is one warning, never a failed command."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure of the tracking library or its store
        print(f"WARNING: tracking: MLflow could not log {what} ({e.__class__.__name__}: {e}); the run directory "
              "holds it")
        return default


def log_report(flat: Mapping[str, Any], run_dir: str | Path) -> None:
    """``report.md``, its plots and the comparison files beside it (``baselines.json``, ``curve.json``) as artifacts
    of the run directory's MLflow run (the report is written after the server finishes)."""
    _after_the_run("the report", lambda: _log_report(flat, run_dir))


def log_baselines(flat: Mapping[str, Any], run_dir: str | Path, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``fedtune baselines``' rows trained here (centralized, local only, majority class) as child runs of the
    federated run's MLflow run: each row's figures at step 0 (federated rows are runs of their own). Returns the
    child runs' ids."""
    return _after_the_run("the baselines", lambda: _log_baselines(flat, run_dir, rows), [])


def _log_report(flat: Mapping[str, Any], run_dir: str | Path) -> None:
    ml = _run_of(flat, run_dir)
    if ml is not None:
        d = Path(run_dir)
        log_files(ml.client, ml.run_id, [d / "report.md", d / "plots", d / "baselines.json", d / "curve.json"])


def _log_baselines(flat: Mapping[str, Any], run_dir: str | Path, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    ml = _run_of(flat, run_dir)
    if ml is None:
        return []
    e, ids, now = ml.entities, [], int(time.time() * 1000)
    for row in rows:
        name = str(row.get("name") or "baseline")
        if name.startswith("federated"):
            continue
        run = ml.client.create_run(ml.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": ml.run_id, "fedtune.kind": "baseline", "fedtune.run_dir": str(run_dir)})
        metrics: dict[str, float] = {}
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                _put(metrics, k, v)
        ml.client.log_batch(run.info.run_id, metrics=[e.Metric(k, v, now, 0) for k, v in metrics.items()],
                            tags=[e.RunTag("fedtune.error", str(row["error"]))] if row.get("error") else [])
        ml.client.set_terminated(run.info.run_id, "FAILED" if row.get("error") else "FINISHED")
        ids.append(run.info.run_id)
    return ids
