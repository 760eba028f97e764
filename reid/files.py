"""Crash-safe files: `atomic_write` (temporary file, fsync, rename) for every state file a process must
find whole after a kill at any moment (journals, progress, pending uploads, privacy ledgers), and
`hold_lock`, which keeps a second process off state that one process owns (a gallery, a site's folder),
and `one_at_a_time`, which makes a short multi-file step one step for every process and thread;
`disk_full`, which tells a full disk (worth trying again later) from other failures."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_swept: set[Path] = set()  # folders whose temporaries left by killed processes are gone
_held: dict[str, IO[str]] = {}  # lock files this process holds


def hold_lock(path: Path) -> IO[str] | None:
    """An exclusive lock on `path` (created if missing), held until the returned file is closed or the
    process ends (a killed process leaves no stale lock); None while another process holds it. It keeps
    other processes out: in this process the held lock is handed out again (a restart in-process)."""
    key = os.path.realpath(path)
    held = _held.get(key)
    if held is not None and not held.closed:
        return held
    f = open(path, "a")  # noqa: SIM115 (the caller keeps it open: that is the lock)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    _held[key] = f
    return f


def disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error that led to it (an exporter may wrap it), is a full disk or quota."""
    for _ in range(8):
        if err is None:
            return False
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive lock on `path` (created if missing) for the block: the blocks of
    every process and thread that take the same path run one after the other (a kill releases it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: readers see the old or the new content, never a torn file. The
    temporary file is the writing thread's own (``.<name>.<pid>.<thread>.tmp``), so two threads writing
    the same path leave one whole version, never a mix or an error; the first write into a folder
    removes the temporaries that killed processes left there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _swept:
        _swept.add(path.parent)
        _sweep(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sweep(folder: Path) -> None:
    for stale in folder.glob(".*.tmp"):
        parts = stale.name.split(".")
        if len(parts) < 5 or not (parts[-3].isdigit() and parts[-2].isdigit()):
            continue  # not one of ours
        pid = int(parts[-3])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # its writer is gone: the rename never came
            stale.unlink(missing_ok=True)
        except OSError:  # (alive, another user's)
            continue
