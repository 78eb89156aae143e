"""Durable file replacement: the one way fedtune writes a state file.

``write_atomic`` writes a uniquely named temporary file beside the target (``.<name>.tmp*``,
which a crashed writer may leave behind), fsyncs it,
renames it over the target and fsyncs the directory, so a reader (or a process that
restarts after a crash or power cut) sees either the old file or the new one, whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) durably; ``mode`` sets the file's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any, **dump_kwargs: Any) -> None:
    """``write_atomic`` of ``obj`` as indented JSON (one trailing newline)."""
    dump_kwargs.setdefault("indent", 1)
    write_atomic(path, json.dumps(obj, **dump_kwargs) + "\n")
