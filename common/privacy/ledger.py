"""A node's privacy ledger: every DP release on one data source, kept on the node's disk.

The budget belongs to a **data source**: by default one per node (:data:`DEFAULT_SOURCE`, the node's
state directory: every job, file, copy or rename spends from the same ledger), or the names the
organization gives in its node config (``source``; ``fedtune local --source``); each simulated node in a
simulation has its own. Never a hash of job settings or a file's path: whatever columns, task, record
limit or file version a job uses, it spends from the same ledger. One JSON file per source under
``<state-dir>/ledger/``, named by a hash of the source name. Records already released under one source
that appear under another name (a copied or renamed file given a new ``source``) are refused
(:class:`SourceConflict`) unless the organization says they are different people's records.

Spending is **reserve, then release**: :meth:`PrivacyLedger.reserve` checks the ceiling
and records the release under an exclusive file lock *before* training or evaluating
starts; :meth:`settle` marks it done afterwards. A crash leaves the reservation counted,
and two processes training on one source at once cannot pass the ceiling together.
Only a reservation whose work failed before anything left the node is cancelled.
Writes are atomic (temporary file, fsync, rename, directory fsync).

Each entry keeps the content fingerprint of the records it used and the size of the
whole source, for audit (``fedtune ledger`` shows where the content changed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fedtune.common.errors import BudgetExceededError, LedgerError, SourceConflict
from fedtune.common.operations.atomic import write_json_atomic
from fedtune.common.privacy import accounting as privacy

log = logging.getLogger(__name__)

FORMAT = 2
COUNTED = ("reserved", "settled")
DEFAULT_SOURCE = "default"  # one budget per node state directory unless the organization names sources
IMPLICIT_SOURCE = "bbc-news (packaged)"  # what fedtune local named the packaged data before DEFAULT_SOURCE
CEILING_TOLERANCE = 1e-9  # an epsilon this close above a ceiling is the ceiling (the accountants' rounding)


def over_ceiling(epsilon: float, ceiling: float) -> bool:
    """Whether ``epsilon`` passes ``ceiling``: the one ceiling check (ledger reservations, job plans, searches)."""
    return epsilon > ceiling + CEILING_TOLERANCE


@dataclass(frozen=True)
class LedgerEntry:
    id: str
    job: str
    round: int
    kind: str  # "train" (DP-SGD steps) | "eval" (a noised evaluation answer)
    noise_multiplier: float
    sample_rate: float
    steps: int
    status: str  # "reserved" | "settled" | "cancelled" (work failed before anything left the node)
    time: float
    fingerprint: str  # content fingerprint of the records used (audit only)
    n_records: int  # records in the whole source at that time
    epsilon_after: float

    @property
    def counted(self) -> bool:
        return self.status in COUNTED

    @property
    def event(self) -> privacy.Event:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def ledger_file(state_dir: str | Path, source: str) -> Path:
    return Path(state_dir) / "ledger" / f"{hashlib.sha256(source.encode('utf-8')).hexdigest()[:32]}.json"


class PrivacyLedger:
    """The spent budget of one data source on one node.

    Args:
        state_dir: the node's state directory.
        source: the name the organization gives this data source (its budget's identity).
        max_epsilon: the node's ceiling; a release that would pass it is refused.
        delta: the node's delta (every epsilon here is at this delta).
        accountant: ``pld`` (default, near-exact) or ``rdp``.
        shared_content_ok: the organization says records whose content was released under another source
            of this node are different people's records (node config ``allow-shared-content``); otherwise
            such a release is refused.
    """

    def __init__(self, state_dir: str | Path, *, source: str, max_epsilon: float,
                 delta: float = privacy.DEFAULT_DELTA, accountant: str = "pld", shared_content_ok: bool = False) -> None:
        if not source:
            raise LedgerError("a privacy ledger needs a data-source name", "name the source in the node config")
        self.state_dir = Path(state_dir)
        self.source = source
        self.path = ledger_file(state_dir, source)
        self.max_epsilon = float(max_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.shared_content_ok = shared_content_ok
        self._data = self._read() or self._new()

    # -- reading -------------------------------------------------------------
    def _new(self) -> dict:
        return {"format": FORMAT, "source": self.source, "created": time.time(), "entries": [], "plans": {},
                "imported": []}

    def _read(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or data.get("source") != self.source:
                raise ValueError("format or source")
            for e in data["entries"]:
                LedgerEntry(**e)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable or inconsistent ({e.__class__.__name__})",
                "restore it from backup; never delete a ledger to regain budget (that voids the guarantee)",
            ) from None
        return data

    def refresh(self) -> None:
        """Re-read the ledger from disk (another process of this node may have written)."""
        current = self._read()
        if current is not None:
            self._data = current

    @property
    def entries(self) -> list[LedgerEntry]:
        """Every entry, cancelled ones included (for audit)."""
        return [LedgerEntry(**e) for e in self._data["entries"]]

    @property
    def counted(self) -> list[LedgerEntry]:
        return [e for e in self.entries if e.counted]

    @property
    def history(self) -> privacy.History:
        return [e.event for e in self.counted]

    def epsilon(self, extra_events: Iterable[privacy.Event] = (), *, upto: int | None = None) -> float:
        """The epsilon of this source's counted releases followed by ``extra_events``, at the node's delta and
        accountant (as held in memory: no re-read). ``upto``: only the first ``upto`` entries (counted or not)."""
        entries = self.entries if upto is None else self.entries[:upto]
        history = [e.event for e in entries if e.counted] + list(extra_events)
        return privacy.epsilon(history, delta=self.delta, kind=self.accountant)

    def spent(self) -> float:
        """Epsilon spent so far on this source (reservations included), at the node's delta."""
        self.refresh()
        return self.epsilon()

    def epsilon_if(self, *events: privacy.Event) -> float:
        return self.epsilon(events)

    # -- writing -------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.refresh()
                if not self.path.exists():
                    self._import_legacy()
                    if self.source == DEFAULT_SOURCE:
                        self._import_implicit()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self) -> None:
        self._data.update(max_epsilon=self.max_epsilon, delta=self.delta, accountant=self.accountant)
        write_json_atomic(self.path, self._data)

    def _import_legacy(self) -> None:
        """Ledgers of fedtune 0.1 were keyed by a hash of the records as read; their releases count here.

        Which source they belonged to is unknown, so a node's first source ledger takes all of them
        (over-counting is safe; under-counting is not) and the old files are renamed ``*.migrated``.
        """
        for p in sorted(self.path.parent.glob("*.json")):
            try:
                old = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if old.get("format") != 1:
                continue
            for e in old.get("entries", []):
                self._data["entries"].append(asdict(LedgerEntry(
                    id=uuid.uuid4().hex, job=str(e["job"]), round=int(e["round"]), kind="train",
                    noise_multiplier=float(e["noise_multiplier"]), sample_rate=float(e["sample_rate"]),
                    steps=int(e["steps"]), status="settled", time=float(e["time"]),
                    fingerprint=str(old.get("dataset_id", "")), n_records=int(old.get("n_records", 0)),
                    epsilon_after=float(e.get("epsilon_after", 0.0)))))
            self._data["imported"].append(p.name)
            self._write()
            with contextlib.suppress(FileNotFoundError):
                p.rename(p.with_name(p.name + ".migrated"))
            log.warning("privacy ledger %s: imported %d releases from the old ledger %s", self.path,
                        len(old.get("entries", [])), p.name)

    def _import_implicit(self) -> None:
        """Before :data:`DEFAULT_SOURCE`, a node without a ``source`` spent under its data file's resolved path
        (``fedtune local``: that path, or the packaged data's name). Those budgets were the node's default
        budget: the first default ledger takes their releases (over-counting is safe), and remembers the
        sources it took, whose content is then not a conflict."""
        for other in open_all(self.state_dir):
            if other.source == self.source or not (other.source.startswith("/") or other.source == IMPLICIT_SOURCE):
                continue
            self._data["entries"].extend(asdict(e) for e in other.entries)
            self._data["imported"].append(other.source)
            self._write()
            with contextlib.suppress(FileNotFoundError):
                other.path.rename(other.path.with_name(other.path.name + ".migrated"))
            log.warning("privacy ledger %s: the node's default budget takes the %d releases of its earlier implicit "
                        "source %r (%s.migrated)", self.path, len(other.counted), other.source, other.path.name)

    def _check_content(self, fingerprint: str) -> None:
        """Refuse records already released under another source of this node (a copy or rename of the data
        given a new source name would otherwise start a fresh budget for the same people)."""
        if self.shared_content_ok or not fingerprint:
            return
        skip = {self.source, *self._data.get("imported", [])}
        for other in open_all(self.state_dir):
            if other.source in skip or not any(e.fingerprint == fingerprint for e in other.counted):
                continue
            raise SourceConflict(
                f"these records (content fingerprint {fingerprint[:12]}...) were already released under data "
                f"source {other.source!r} of this node (epsilon {other.spent():.3f} spent there); spending them "
                f"under {self.source!r} would start a fresh budget for the same people",
                f"use source {other.source!r} for this data (node config `source`, `fedtune local --source`), or, "
                "if these are in fact different people's records with identical content, set node config "
                "allow-shared-content=on")

    def plan(self, job: str, key: str, compute: Callable[[privacy.History], dict]) -> dict:
        """The noise plan of ``job`` on this source, computed once (from the history before it) and kept.

        A job's noise is calibrated once, at its first release, against everything spent before it;
        later rounds reuse it. A job whose settings change (another ``key``) is planned again.
        """
        with self._locked():
            plans = self._data.setdefault("plans", {})
            old = plans.get(job)
            if old is not None and old.get("key") == key:
                return old
            plan = dict(compute(self.history), key=key, time=time.time())
            plans[job] = plan
            self._write()
            return plan

    def reserve(self, *, job: str, round: int, kind: str, noise_multiplier: float, sample_rate: float, steps: int,
                fingerprint: str, n_records: int, job_limit: int | None = None) -> LedgerEntry:
        """Check the ceiling and record the release, under the lock, before any work starts.

        Args:
            job_limit: the most rounds with a release of this ``kind`` the job planned for (None: no limit).

        Raises:
            PrivacyError: delta above 1/N for this source's size.
            BudgetExceededError: the release would take the source past the node's ceiling, or the
                job past its planned number of releases.
        """
        with self._locked():
            privacy.check_delta(self.delta, n_records, where=f"data source {self.source!r}")
            self._check_content(fingerprint)
            # a job's plan covers job_limit rounds; a round interrupted (e.g. by a server crash) and run again
            # after a resume is the same round: its second release counts in full, but not as a new round
            done = {e.round for e in self.counted if e.job == job and e.kind == kind}
            if job_limit is not None and int(round) not in done and len(done) >= job_limit:
                raise BudgetExceededError(
                    f"job {job!r} already made its {job_limit} planned {kind} release(s) on data source "
                    f"{self.source!r}; its budget covers no more",
                    "start a new job (its releases count against the same ceiling), or resume with more "
                    "train.rounds")
            event = (float(noise_multiplier), float(sample_rate), int(steps))
            after = self.epsilon([event])
            if over_ceiling(after, self.max_epsilon):
                spent = self.epsilon()
                raise BudgetExceededError(
                    f"privacy budget exceeded for data source {self.source!r}: spent epsilon {spent:.3f} of this "
                    f"node's ceiling {self.max_epsilon:g} (delta {self.delta:.2g}); this {kind} release "
                    f"({steps} steps, noise {noise_multiplier:.3f}, rate {sample_rate:.4f}) would bring it to "
                    f"{after:.3f}. Ledger: {self.path}",
                    "train less (fewer rounds or steps, lower privacy.target-epsilon), or have the node's "
                    "administrator raise its ceiling knowingly; the spent budget cannot be returned",
                )
            entry = LedgerEntry(id=uuid.uuid4().hex, job=str(job), round=int(round), kind=kind,
                                noise_multiplier=event[0], sample_rate=event[1], steps=event[2], status="reserved",
                                time=time.time(), fingerprint=fingerprint, n_records=int(n_records),
                                epsilon_after=after)
            self._data["entries"].append(asdict(entry))
            self._write()
            return entry

    def _update(self, entry: LedgerEntry, **changes) -> LedgerEntry:
        with self._locked():
            for i, e in enumerate(self._data["entries"]):
                if e["id"] == entry.id:
                    if e["status"] != "reserved":
                        raise LedgerError(f"ledger entry {entry.id} is already {e['status']}",
                                          "this is a bug in fedtune; report it with the ledger file")
                    e.update(changes)
                    e["epsilon_after"] = self.epsilon(upto=i + 1)
                    self._write()
                    return LedgerEntry(**e)
        raise LedgerError(f"ledger entry {entry.id} is missing from {self.path}",
                          "restore the ledger from backup; never edit or delete a ledger")

    def settle(self, entry: LedgerEntry, *, steps: int | None = None) -> LedgerEntry:
        """Mark a reservation as released (with the steps really taken, never more than reserved)."""
        taken = entry.steps if steps is None else min(int(steps), entry.steps)
        return self._update(entry, status="settled", steps=taken)

    def cancel(self, entry: LedgerEntry) -> LedgerEntry:
        """Return a reservation whose work failed before anything derived from the data left the node."""
        return self._update(entry, status="cancelled")

    def summary(self) -> dict:
        counted = self.counted
        last = next((e for e in reversed(counted) if e.kind == "train"), None)
        prints = [e.fingerprint for e in counted]
        return {"source": self.source, "path": str(self.path), "epsilon_spent": self.spent(),
                "max_epsilon": self.max_epsilon, "delta": self.delta, "accountant": self.accountant,
                "releases": len(counted), "train_releases": sum(e.kind == "train" for e in counted),
                "eval_releases": sum(e.kind == "eval" for e in counted),
                "steps": sum(e.steps for e in counted if e.kind == "train"),
                "noise_multiplier": last.noise_multiplier if last else None,
                "sample_rate": last.sample_rate if last else None,
                "n_records": counted[-1].n_records if counted else None,
                "content_changes": sum(1 for a, b in zip(prints, prints[1:]) if a != b),
                "imported": list(self._data.get("imported", []))}


def open_all(state_dir: str | Path) -> list[PrivacyLedger]:
    """Every source ledger under a node's state directory, as last written (for printing and monitoring)."""
    out = []
    for p in sorted((Path(state_dir) / "ledger").glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            if data.get("format") == 1:
                continue  # see legacy_files()
            out.append(PrivacyLedger(state_dir, source=data["source"], max_epsilon=data.get("max_epsilon", math.inf),
                                     delta=data.get("delta", privacy.DEFAULT_DELTA),
                                     accountant=data.get("accountant", "pld")))
        except (OSError, ValueError, KeyError, TypeError):
            raise LedgerError(f"privacy ledger {p} is unreadable",
                              "restore it from backup; never delete a ledger to regain budget") from None
    return out


def legacy_files(state_dir: str | Path) -> list[Path]:
    """fedtune 0.1 ledgers (keyed by a records hash) not yet imported by a source ledger."""
    out = []
    for p in sorted((Path(state_dir) / "ledger").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(p.read_text(encoding="utf-8")).get("format") == 1:
                out.append(p)
    return out
