"""A node's privacy ledger: every DP-SGD release on a dataset, kept on the node's disk.

One JSON file per dataset (its content fingerprint) under
``<state-dir>/ledger/``. Every job that trains on the same records appends to
the same file, so they spend from one budget. Appends are atomic (write a
temporary file, fsync, rename, fsync the directory) and serialised with a file
lock, and happen *before* trained weights leave the node: a crash can only
over-count, never under-count.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import privacy
from common.errors import BudgetExceededError, LedgerError

FORMAT = 1


@dataclass(frozen=True)
class LedgerEntry:
    job: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    time: float
    epsilon_after: float


class PrivacyLedger:
    """The spent budget of one dataset on one node.

    Args:
        state_dir: the node's state directory.
        dataset_id: fingerprint of the dataset's records.
        n_records: records in the dataset (for the automatic delta).
        delta: this node's delta (0 = automatic). Fixed when the ledger is created.
        max_epsilon: the node's ceiling; training that would pass it is refused.
        accountant: accountant used for the ledger's epsilon. Fixed at creation.
    """

    def __init__(self, state_dir: str | Path, *, dataset_id: str, n_records: int, delta: float = 0.0,
                 max_epsilon: float, accountant: str = "rdp") -> None:
        self.path = Path(state_dir) / "ledger" / f"{dataset_id[:32]}.json"
        self.dataset_id = dataset_id
        self.max_epsilon = float(max_epsilon)
        data = self._read()
        if data is None:
            data = {"format": FORMAT, "dataset_id": dataset_id, "n_records": n_records,
                    "delta": delta or privacy.default_delta(n_records), "accountant": accountant,
                    "created": time.time(), "entries": []}
        self._data = data

    # -- reading -------------------------------------------------------------
    def _read(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            assert data["format"] == FORMAT and data["dataset_id"] == self.dataset_id
            for e in data["entries"]:
                float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable or inconsistent ({e.__class__.__name__})",
                "restore it from backup; never delete a ledger to regain budget (that voids the guarantee)",
            ) from None
        return data

    def refresh(self) -> None:
        """Re-read the ledger from disk (another process of this node may have appended)."""
        current = self._read()
        if current is not None:
            self._data = current

    @property
    def delta(self) -> float:
        return float(self._data["delta"])

    @property
    def accountant(self) -> str:
        return str(self._data["accountant"])

    @property
    def entries(self) -> list[LedgerEntry]:
        return [LedgerEntry(**e) for e in self._data["entries"]]

    @property
    def history(self) -> privacy.History:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def spent(self) -> float:
        """Epsilon spent so far on this dataset (at the ledger's delta)."""
        self.refresh()
        return privacy.epsilon(self.history, delta=self.delta, kind=self.accountant)

    def epsilon_if(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after a further release of ``steps`` DP-SGD steps."""
        return privacy.epsilon(self.history + [(noise_multiplier, sample_rate, steps)], delta=self.delta,
                               kind=self.accountant)

    def check(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise BudgetExceededError if the release would pass the ceiling; else return epsilon after it."""
        self.refresh()
        after = self.epsilon_if(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if after > self.max_epsilon + 1e-9:
            spent = self.spent()
            raise BudgetExceededError(
                f"privacy budget exceeded for dataset {self.dataset_id[:12]}: spent epsilon {spent:.3f} of this "
                f"node's ceiling {self.max_epsilon:g} (delta {self.delta:.2g}); this training "
                f"({steps} steps, noise {noise_multiplier:.3f}, rate {sample_rate:.4f}) would bring it to "
                f"{after:.3f}. Ledger: {self.path}",
                "train less (fewer rounds or steps, lower privacy.target-epsilon), or have the node's "
                "administrator raise its ceiling knowingly; the spent budget cannot be returned",
            )
        return after

    # -- writing -------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def record(self, *, job: str, round: int, noise_multiplier: float, sample_rate: float,
               steps: int) -> LedgerEntry:
        """Append a release durably (fsync'd) and return it. Re-reads under the lock first."""
        with self._locked():
            self.refresh()
            entry = {"job": job, "round": int(round), "noise_multiplier": float(noise_multiplier),
                     "sample_rate": float(sample_rate), "steps": int(steps), "time": time.time(),
                     "epsilon_after": 0.0}
            entry["epsilon_after"] = privacy.epsilon(
                self.history + [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])],
                delta=self.delta, kind=self.accountant)
            data = dict(self._data, entries=self._data["entries"] + [entry], max_epsilon=self.max_epsilon)
            _atomic_write(self.path, json.dumps(data, indent=1) + "\n")
            self._data = data
        return LedgerEntry(**entry)

    def summary(self) -> dict:
        total_steps = sum(e.steps for e in self.entries)
        last = self.entries[-1] if self.entries else None
        return {"dataset_id": self.dataset_id, "path": str(self.path), "epsilon_spent": self.spent(),
                "max_epsilon": self.max_epsilon, "delta": self.delta, "accountant": self.accountant,
                "releases": len(self.entries), "steps": total_steps,
                "noise_multiplier": last.noise_multiplier if last else None,
                "sample_rate": last.sample_rate if last else None,
                "n_records": self._data.get("n_records")}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_all(state_dir: str | Path) -> list[PrivacyLedger]:
    """Every ledger under a node's state directory (for printing and monitoring)."""
    out = []
    for p in sorted((Path(state_dir) / "ledger").glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            out.append(PrivacyLedger(state_dir, dataset_id=data["dataset_id"], n_records=data["n_records"],
                                     max_epsilon=data.get("max_epsilon", math.inf)))
        except (OSError, ValueError, KeyError, TypeError):
            raise LedgerError(f"privacy ledger {p} is unreadable",
                              "restore it from backup; never delete a ledger to regain budget") from None
    return out
