"""Logging with the site and the round in every line.

`configure_logging()` installs one stderr handler whose records carry ``site`` and ``round`` fields,
filled from context variables that the runtimes set with `log_context(site=..., round=...)`. Every record
is one line: control characters in a message (a peer's text, such as a site's failure reason) are
escaped, so no remote input can forge a log line, and a line is cut at MAX_LINE_CHARS. Lines of one kind
(the same message template and first argument, in the same site context) are shown at most
REPEATS_SHOWN times per REPEAT_WINDOW_S; the next one shown after a pause says how many were held back,
so a flood of bad messages costs a count, not a disk of log lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import faulthandler
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_site: contextvars.ContextVar[str] = contextvars.ContextVar("site", default="-")
_round: contextvars.ContextVar[str] = contextvars.ContextVar("round", default="-")

FORMAT = "%(asctime)s %(levelname)-7s [site=%(site)s round=%(round)s] %(name)s: %(message)s"
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127) if c != 9} | {10: "\\n", 13: "\\r"}
MAX_LINE_CHARS = 8000
REPEATS_SHOWN = 10
REPEAT_WINDOW_S = 60.0


def one_line(text: str) -> str:
    """`text` with control characters escaped (for a log line or a terminal)."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """FORMAT with control characters escaped in the line and the line cut at MAX_LINE_CHARS; a
    traceback still follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = one_line(super().formatMessage(record))
        if len(line) > MAX_LINE_CHARS:
            line = f"{line[:MAX_LINE_CHARS]}... ({len(line) - MAX_LINE_CHARS} more characters)"
        return line


class RepeatFilter(logging.Filter):
    """Shows at most REPEATS_SHOWN lines of one kind per REPEAT_WINDOW_S (kind: logger, message template,
    first argument, site); the first line of that kind after the window says how many were held back."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._seen: dict[tuple, list] = {}  # kind -> [window start, lines shown, lines held back]

    def filter(self, record: logging.LogRecord) -> bool:
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        kind = (record.name, str(record.msg), str(first)[:200], getattr(record, "site", None))
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is None or now - seen[0] > REPEAT_WINDOW_S:
                held = seen[2] if seen is not None else 0
                if len(self._seen) >= 4096:  # kinds from long ago go (bounded, whatever the input)
                    self._seen = {k: v for k, v in self._seen.items() if now - v[0] <= REPEAT_WINDOW_S}
                self._seen[kind] = [now, 1, 0]
                if held:
                    record.msg, record.args = f"{record.getMessage()} ({held} more like this held back)", None
                return True
            if seen[1] < REPEATS_SHOWN:
                seen[1] += 1
                return True
            seen[2] += 1
            return False


class SaidOnce:
    """A lasting failure said once: a loop that tries again asks `new(reason)` before its log line, which
    is true only when the reason differs from the one asked about last (one line per reason, not per try)."""

    def __init__(self) -> None:
        self.last = ""

    def new(self, reason: str) -> bool:
        fresh, self.last = reason != self.last, reason
        return fresh


class ContextFilter(logging.Filter):
    """Adds the current site and round to every record that passes the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.site = getattr(record, "site", None) or _site.get()
        record.round = getattr(record, "round", None) or _round.get()
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (survives redirection, e.g. in test runners)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


QUIET_LIBRARIES = (
    "onnxscript",
    "onnx_ir",
    "onnxruntime",
    "torch.onnx",
    "torch._dynamo",
    "paho",
    "amqtt",
    "PIL",
)


def configure_logging(level: str | int = "INFO") -> None:
    """Idempotent: one handler on the root logger with the site/round format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.addFilter(ContextFilter())
    handler.addFilter(RepeatFilter())
    handler.setFormatter(OneLineFormatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for chatty in QUIET_LIBRARIES:  # their INFO lines (ONNX rewrites, HTTP, ...) are not ours to show
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        # `kill -USR1 <pid>` prints every thread's stack (for a stuck process); needs a real stderr
        with contextlib.suppress(AttributeError, OSError, ValueError):
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


@contextlib.contextmanager
def log_context(site: str | None = None, round: int | str | None = None) -> Iterator[None]:
    """Set the site and/or round shown in log lines inside the block (thread- and task-local)."""
    tokens = []
    if site is not None:
        tokens.append((_site, _site.set(str(site))))
    if round is not None:
        tokens.append((_round, _round.set(str(round))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bound(fn: Callable[..., T], site: str | None = None) -> Callable[..., T]:
    """`fn` running inside `log_context(site=site)`, e.g. an MQTT handler on a worker thread."""

    def wrapped(*args: object, **kwargs: object) -> T:
        with log_context(site=site):
            return fn(*args, **kwargs)

    return wrapped
