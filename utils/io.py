"""Atomic file writes: a crash or Ctrl-C never leaves a half-written checkpoint, JSON or CSV behind.

In a distributed job only rank 0 writes: every rank runs the same code in lockstep and holds the same
results, so the writers here (and :mod:`utils.plotting`'s) do nothing on the other ranks. A rank that must
read what rank 0 has just written waits at a barrier first (``utils.distributed.barrier``).
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, IO, Iterable, Iterator

import torch

from utils import distributed as du


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def make_tempfile(path: Path) -> str:
    """A temporary file next to ``path`` with the permissions a normal ``open(path, "w")`` would give."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, _umask_mode())  # mkstemp creates 0600 files
    return tmp


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    if not du.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tempfile(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n", path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_csv(rows: Iterable[Dict[str, Any]], path: str | os.PathLike) -> None:
    """Write flat dicts as one CSV (columns in first-seen order), replacing ``path`` atomically."""
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes (hex), or '' when there is no such file: what a cache or a stage was made from."""
    path = Path(path)
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else ""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) inside the block, so processes of one
    machine that would compute the same shared result take turns: the second finds the first's result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
