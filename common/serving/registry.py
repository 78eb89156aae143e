"""A registry of exported model versions, with a "current" version, promotion and rollback.

    <registry>/registry.json      the whole state: versions, current, history (replaced atomically)
    <registry>/versions/<id>/     one export directory per version (common/serving/export.py), never modified
    <registry>/log.jsonl          what was done when (add / promote / rollback), for audit
    <registry>/.lock              writers hold an exclusive lock on it

Consistency: a version directory is written under a temporary name and renamed into place before
``registry.json`` mentions it; ``registry.json`` is written to a temporary file, fsync'd and renamed
over the old one. A crash at any point leaves either the old state or the new one; a left-over
temporary file or directory is ignored and cleaned by the next writer. "current" can only ever name
a complete version whose files matched their recorded sha256 when it was promoted, and a version is
verified again before it is promoted, rolled back to, or served.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedtune.common.errors import AdapterError, ExportError, RegistryError
from fedtune.common.operations.atomic import fsync_dir, write_json_atomic
from fedtune.common.serving import export

STATE = "registry.json"
_ID = re.compile(r"^v(\d+)$")


class Registry:
    """One registry directory. Reading needs no lock; every change holds ``.lock``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    # -- state ------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.path / STATE

    def version_dir(self, vid: str) -> Path:
        return self.path / "versions" / vid

    def exists(self) -> bool:
        return self.state_file.is_file()

    def state(self) -> dict:
        """The registry's state (an empty registry if it was never written)."""
        if not self.path.exists():
            raise RegistryError(f"registry {self.path} does not exist",
                                "create it by adding a version: `fedtune registry add RUN_DIR --registry DIR`")
        if not self.state_file.exists():
            foreign = [p for p in self.path.iterdir() if not p.name.startswith(".")
                       and p.name not in ("versions", "log.jsonl")]
            if foreign:
                raise RegistryError(f"{self.path} is not a fedtune registry (no {STATE})",
                                    "point --registry at a registry directory, or at a new empty one")
            return {"format": 1, "versions": {}, "current": None, "history": []}
        try:
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RegistryError(f"{self.state_file} is unreadable ({e.__class__.__name__})",
                                "restore it from a backup; the version directories under versions/ are intact "
                                "and each holds its own fedtune-export.json") from None

    def _write_state(self, state: dict) -> None:
        write_json_atomic(self.state_file, state, indent=2, sort_keys=True)  # the commit point

    def _log(self, action: str, **fields) -> None:
        with open(self.path / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "action": action, **fields}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RegistryError(f"another fedtune process is changing registry {self.path}",
                                    "wait for it to finish and try again") from None
            self._clean_leftovers()
            yield self.state()

    def _clean_leftovers(self) -> None:
        """Remove what a crashed writer left: temporary state files and half-written version directories."""
        for p in self.path.glob(f".{STATE}.tmp*"):
            p.unlink(missing_ok=True)
        versions = self.path / "versions"
        if versions.is_dir():
            for p in versions.glob(".*.partial-*"):
                shutil.rmtree(p, ignore_errors=True)

    # -- queries ------------------------------------------------------------------
    def versions(self) -> list[dict]:
        """Every version's entry, oldest first, each with ``current: bool``."""
        st = self.state()
        return [{**v, "current": v["id"] == st["current"]}
                for v in sorted(st["versions"].values(), key=lambda v: int(_ID.match(v["id"]).group(1)))]

    def entry(self, vid: str | None = None) -> dict:
        """One version's entry (``None``: the current version)."""
        st = self.state()
        if vid is None:
            if not st["current"]:
                raise RegistryError(f"registry {self.path} has no current version",
                                    "promote one: `fedtune registry promote VERSION` (see `fedtune registry list`)")
            vid = st["current"]
        if vid not in st["versions"]:
            known = ", ".join(sorted(st["versions"], key=lambda v: int(v[1:]))) or "none"
            raise RegistryError(f"registry {self.path} has no version {vid!r} (versions: {known})",
                                "pick one of the listed versions (`fedtune registry list`)")
        return st["versions"][vid]

    def verify(self, vid: str | None = None) -> Path:
        """Check a version's files against the hashes recorded when it was added; returns its directory.

        Raises:
            RegistryError: the version is missing, incomplete, or its files do not match their sha256.
        """
        e = self.entry(vid)
        d = self.version_dir(e["id"])
        try:
            record = export.read_record(d)
            if record.get("weights_sha256") != e["weights_sha256"]:
                raise AdapterError(f"its fedtune-export.json records weights {str(record.get('weights_sha256'))[:12]}"
                                   f"... but the registry recorded {e['weights_sha256'][:12]}...", "")
            if e.get("files_sha256") and _files_hash(record) != e["files_sha256"]:
                raise AdapterError("its file list (fedtune-export.json) differs from the one the registry recorded",
                                   "")
            export.verify(d, record)
        except (AdapterError, ExportError) as err:
            raise RegistryError(f"version {e['id']} is corrupted and will not be used: {err.problem}",
                                f"restore {d} from a backup, or add its run again (`fedtune registry add "
                                f"{e['source_run_dir']} --round {e['source_round']} --registry {self.path}`); meanwhile promote another "
                                "version or roll back") from None
        return d

    def resolve(self, vid: str | None = None) -> Path:
        """The verified directory of a version (default: the current one), for serving."""
        return self.verify(vid)

    # -- changes ------------------------------------------------------------------
    def add(self, run_dir: str | Path, *, round: int | None = None, name_nodes: bool = False,
            base_model: str | None = None, note: str = "", progress: Callable[[str], None] = lambda s: None) -> dict:
        """Export ``run_dir`` (final adapter or ``round``) as a new version; it is not promoted."""
        with self._locked() as st:
            (self.path / "versions").mkdir(exist_ok=True)
            taken = [int(m.group(1)) for m in (_ID.match(p.name) for p in (self.path / "versions").iterdir()) if m]
            taken += [int(v[1:]) for v in st["versions"]]
            vid = f"v{max(taken, default=0) + 1}"
            record = export.export_run(run_dir, self.version_dir(vid), round=round, name_nodes=name_nodes,
                                       base_model=base_model, progress=progress)
            fsync_dir(self.path / "versions")
            entry = _entry(vid, record, note)
            st["versions"][vid] = entry
            self._write_state(st)
            self._log("add", version=vid, run=record["source"]["run_dir"], round=record["source"]["round"])
            return entry

    def promote(self, vid: str) -> dict:
        """Make ``vid`` the current version (after verifying its files); the old current can be rolled back to."""
        with self._locked() as st:
            self.entry(vid)
            self.verify(vid)
            if st["current"] == vid:
                return st
            if st["current"]:
                st["history"].append(st["current"])
            previous, st["current"] = st["current"], vid
            st["versions"][vid]["promoted"] = time.time()
            self._write_state(st)
            self._log("promote", version=vid, previous=previous)
            return st

    def rollback(self) -> dict:
        """Make the version that was current before the last promotion current again."""
        with self._locked() as st:
            if not st["history"]:
                raise RegistryError(f"registry {self.path} has nothing to roll back to"
                                    + (f" (current is {st['current']}, the first version promoted)" if st["current"]
                                       else " (no version was ever promoted)"),
                                    "promote a specific version instead: `fedtune registry promote VERSION`")
            target = st["history"][-1]
            self.verify(target)
            bad = st["current"]
            st["history"].pop()
            st["current"] = target
            if bad:
                st["versions"][bad]["rolled_back"] = time.time()
            self._write_state(st)
            self._log("rollback", version=target, previous=bad)
            return st


def _files_hash(record: dict) -> str:
    """One sha256 over every file's name, size and sha256: the registry's own copy of the manifest."""
    import hashlib

    return hashlib.sha256(json.dumps(record.get("files") or {}, sort_keys=True).encode()).hexdigest()


def _entry(vid: str, record: dict, note: str) -> dict:
    from fedtune.common.serving.modelcard import privacy_summary

    test = (record["metrics"].get("test") or {})
    fed = (record["metrics"].get("federated") or {})
    ps = privacy_summary(record)
    return {
        "id": vid, "created": record["created"], "note": note,
        "source_run": record["source"]["run"], "source_run_dir": record["source"]["run_dir"],
        "source_round": record["source"]["round"], "checkpoint": record["source"]["checkpoint"],
        "weights_sha256": record["weights_sha256"], "adapter_sha256": record["adapter_sha256"],
        "files_sha256": _files_hash(record),
        "size_bytes": sum(f["size"] for f in record["files"].values()),
        "metrics": {"test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
                    "test_loss": test.get("loss"), "test_n": test.get("n"),
                    "federated_accuracy": fed.get("accuracy"), "worst_node_accuracy": fed.get("worst_accuracy"),
                    "per_class_f1": {k: c["f1"] for k, c in (record["metrics"].get("per_class") or {}).items()}},
        "privacy": {"dp": ps["dp"], "epsilon_max": ps["epsilon_max"], "delta_max": ps["delta_max"],
                    "accountant": ps["accountant"], "secure_aggregation": ps["secure_aggregation"],
                    "nodes": ps["nodes"]},
    }


def compare(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, value in a, value in b, b - a) for every figure two version entries share."""
    rows = []
    ma, mb = a["metrics"], b["metrics"]
    for key in ("test_accuracy", "test_macro_f1", "test_loss", "federated_accuracy", "worst_node_accuracy"):
        rows.append((key, ma.get(key), mb.get(key)))
    for lab in sorted(set(ma.get("per_class_f1") or {}) | set(mb.get("per_class_f1") or {})):
        rows.append((f"f1[{lab}]", (ma.get("per_class_f1") or {}).get(lab), (mb.get("per_class_f1") or {}).get(lab)))
    rows.append(("epsilon_max", a["privacy"].get("epsilon_max"), b["privacy"].get("epsilon_max")))
    return [(k, x, y, (y - x) if x is not None and y is not None else None) for k, x, y in rows]
