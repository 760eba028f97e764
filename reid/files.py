"""Crash-safe files: `atomic_write` (temporary file, fsync, rename) for every state file a process must
find whole after a kill at any moment (journals, progress, pending uploads, privacy ledgers)."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: readers see the old or the new content, never a torn file. The
    temporary file is the writing thread's own, so two threads writing the same path leave one whole
    version, never a mix or an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
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
