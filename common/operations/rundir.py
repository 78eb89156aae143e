"""The run directory: the one place a federated run's record lives.

    <run>/run.json                status, planned/completed rounds, times (rewritten atomically)
    <run>/config.json             the resolved job configuration (flat settings)
    <run>/rounds.jsonl            one JSON line per finished round (appended, fsync'd)
    <run>/checkpoints/round-<k>/  the global adapter after round k (PEFT directory)
    <run>/adapter/                the final global adapter (PEFT directory)
    <run>/initial.json            the round-0 evaluation (the base model before any round)
    <run>/summary.json            final metrics and per-node privacy
    <run>/progress.json           where the server is inside the run (rewritten atomically; live views only)
    <run>/nodes/<name>/           simulated nodes' state (their privacy ledgers)
    <run>/tensorboard/            TensorBoard event files (fed.tracking=tensorboard; common/operations/tracking.py)

``RunDir`` is the one reader and writer of these files. A round line is a :class:`RoundRecord`, the summary a
:class:`RunSummary` (common/operations/records.py: their fields, and how lines of older fedtune versions read).
Readers (dashboard, export, report, resume) only read; the server is the only writer (``fedtune tune`` adds its
search's cost to the summary of the run it chose).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fedtune.common.errors import RunDirError
from fedtune.common.operations.atomic import write_json_atomic
from fedtune.common.operations.records import RoundProgress, RoundRecord, RunSummary

__all__ = ["INITIAL_FILE", "PROGRESS_FILE", "RoundProgress", "RoundRecord", "RunDir", "RunSummary"]

# settings a resumed run may change: more rounds, and where it is tracked (the run itself is the same)
RESUMABLE_CHANGES = ("fed.resume", "train.rounds", "fed.tracking", "fed.tracking-uri", "fed.tracking-experiment")
INITIAL_FILE = "initial.json"  # the round-0 evaluation (the base model before any round)
PROGRESS_FILE = "progress.json"  # where a running server is: round, phase, nodes asked / replied so far


def _atomic_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=2, sort_keys=True, default=_jsonable)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunDir:
    """Writer and reader of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- paths ----------------------------------------------------------------
    @property
    def rounds_file(self) -> Path:
        return self.path / "rounds.jsonl"

    def checkpoint(self, k: int) -> Path:
        return self.path / "checkpoints" / f"round-{k}"

    @property
    def final_adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard's event files, when the job tracks to TensorBoard (written by ``tracking``)."""
        return self.path / "tensorboard"

    @property
    def stop_file(self) -> Path:
        """An operator creates this file to stop the run after the current round (resumable)."""
        return self.path / "STOP"

    def stop_requested(self) -> bool:
        return self.stop_file.exists()


    # -- writing --------------------------------------------------------------
    def create(self, *, config: dict, planned_rounds: int, resume: bool, kind: str = "deployment") -> None:
        """Start a run here (or, with ``resume``, reopen it after checking it is this run)."""
        if resume:
            if not (self.path / "run.json").is_file():
                raise RunDirError(f"cannot resume: {self.path} is not a fedtune run directory (no run.json)",
                                  "set fed.run-dir to the directory of the run to resume")
            old = self.read_config()
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k)
                             and k not in RESUMABLE_CHANGES)
            if changed:
                raise RunDirError(f"cannot resume {self.path}: settings differ from the original run: "
                                  f"{', '.join(changed[:8])}",
                                  "resume with the original settings (only train.rounds may grow)")
            self.stop_file.unlink(missing_ok=True)
            self.set_status("running", planned_rounds=planned_rounds)
            return
        if (self.path / "run.json").exists():
            raise RunDirError(f"{self.path} already holds a run",
                              "choose a new fed.run-dir, or set fed.resume=true to continue that run")
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        _atomic_json(self.path / "config.json", config)
        _atomic_json(self.path / "run.json", {"status": "running", "planned_rounds": planned_rounds,
                                              "completed_rounds": 0, "started": time.time(),
                                              "updated": time.time(), "pid": os.getpid(), "kind": kind})

    @property
    def kind(self) -> str:
        """"simulation" or "deployment" as the server recorded it (runs of fedtune 0.1: guessed from nodes/)."""
        return self.read_run().get("kind") or ("simulation" if (self.path / "nodes").is_dir() else "deployment")

    def set_status(self, status: str, **fields: Any) -> None:
        info = self.read_run()
        info.update(fields, status=status, updated=time.time())
        if status != "running":
            info["finished"] = time.time()
        _atomic_json(self.path / "run.json", info)

    def append_round(self, record: RoundRecord) -> None:
        """One line in rounds.jsonl (fsync'd), then run.json's count of completed rounds."""
        line = json.dumps(record.to_json(), sort_keys=True, default=_jsonable)
        with open(self.rounds_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        info = self.read_run()
        info.update(completed_rounds=record.round, updated=time.time())
        _atomic_json(self.path / "run.json", info)

    def write_summary(self, summary: RunSummary) -> None:
        _atomic_json(self.path / "summary.json", summary.to_json())

    def write_progress(self, progress: RoundProgress) -> None:
        """Where the server is now (``progress.json``, replaced whole): for the dashboard and ``fedtune status``."""
        _atomic_json(self.path / PROGRESS_FILE, progress.to_json())

    def write_initial(self, evaluation: dict) -> None:
        """The round-0 evaluation (the model before any round), kept for the summary and the report."""
        _atomic_json(self.path / INITIAL_FILE, evaluation)

    # -- reading --------------------------------------------------------------
    def read_run(self) -> dict:
        try:
            return json.loads((self.path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RunDirError(f"{self.path} is not a readable run directory ({e.__class__.__name__})",
                              "point at a directory written by a fedtune server") from None

    def read_config(self) -> dict:
        try:
            config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RunDirError(f"{self.path}/config.json is missing or unreadable ({e.__class__.__name__})",
                              "point at a directory written by a fedtune server") from None
        if not isinstance(config, dict):
            raise RunDirError(f"{self.path}/config.json holds no settings", "point at a directory written by a "
                              "fedtune server")
        return config

    def rounds(self) -> list[RoundRecord]:
        """Every complete round line (a torn last line, from a crash mid-write, is ignored); lines of older
        fedtune versions read too (``RoundRecord.from_json``)."""
        if not self.rounds_file.exists():
            return []
        out = []
        for line in self.rounds_file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(RoundRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
                continue
        return out

    def resume_point(self) -> tuple[int, Path | None]:
        """(last finished round, checkpoint of the last successful one or None): where a resume starts.

        A checkpoint is written before its round line, so a crash between the two re-runs that round.
        """
        rounds = self.rounds()
        done = max((r.round for r in rounds), default=0)
        ok = [r.round for r in rounds if r.ok and self.checkpoint(r.round).is_dir()]
        return done, (self.checkpoint(max(ok)) if ok else None)

    def summary(self) -> RunSummary | None:
        p = self.path / "summary.json"
        if not p.exists():
            return None
        try:
            return RunSummary.from_json(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            raise RunDirError(f"{p} is damaged ({e.__class__.__name__})",
                              "restore it from a backup, or remove it: the rounds in rounds.jsonl still show") from None

    def progress(self) -> RoundProgress | None:
        """The server's last written position (None when it wrote none, or the file is unreadable); it is live
        only while ``run.json`` says the run is running."""
        try:
            return RoundProgress.from_json(json.loads((self.path / PROGRESS_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def initial(self) -> dict | None:
        """The round-0 evaluation, None when the server evaluated none (or the file is unreadable)."""
        try:
            return json.loads((self.path / INITIAL_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
