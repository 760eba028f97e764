"""Dynamic batching of concurrent inference requests (as Triton's dynamic batcher).

Each request brings a few preprocessed crops; a single worker thread takes the oldest request, keeps
adding waiting requests until the batch holds `max_batch` crops or `max_delay_ms` has passed since the
first one arrived, runs the model once on the whole batch and hands each request its rows. A request is
never split across batches. The queue is bounded (`max_queue` crops): a request that does not fit is
refused at once with `QueueFull` (the HTTP layer answers 503 with Retry-After), so overload never grows
memory or latency without bound.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np


class QueueFull(RuntimeError):
    """The batcher holds `max_queue` crops already; the client should retry after `retry_after` s."""

    def __init__(self, queued: int, retry_after: float) -> None:
        super().__init__(f"inference queue full ({queued} crops waiting)")
        self.retry_after = retry_after


@dataclass
class _Request:
    batch: np.ndarray
    future: Future
    arrived: float


Runner = Callable[[np.ndarray], tuple[np.ndarray, object]]  # batch -> (features, what ran it)


class DynamicBatcher:
    def __init__(
        self,
        run: Runner,
        max_batch: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """`run` maps an (N, 3, H, W) batch to (N, D) features plus a tag of the model that ran it
        (every request of a batch gets the same tag); `on_batch(size, seconds)` observes each batch."""
        self.run = run
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued = 0  # crops waiting
        self._cond = threading.Condition()
        self._closed = False
        self._seconds_per_crop = 0.01  # running estimate, for Retry-After
        self._worker = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._worker.start()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def seconds_per_crop(self) -> float:
        """What one crop has recently cost a batch (a running estimate)."""
        return self._seconds_per_crop

    def submit(self, batch: np.ndarray) -> Future:
        """Queue preprocessed crops; the future gives (features, tag). QueueFull when they do not fit."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._queued and self._queued + len(batch) > self.max_queue:
                raise QueueFull(self._queued, max(0.05, self._queued * self._seconds_per_crop))
            self._queue.append(_Request(batch, future, time.monotonic()))
            self._queued += len(batch)
            self._cond.notify()
        return future

    def _take(self) -> list[_Request] | None:
        """The next batch: the oldest request plus those that fit, waiting at most max_delay for more."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            taken = [self._queue.popleft()]
            size = len(taken[0].batch)
            due = taken[0].arrived + self.max_delay
            while size < self.max_batch:
                if self._queue:
                    if size + len(self._queue[0].batch) > self.max_batch:
                        break
                    taken.append(self._queue.popleft())
                    size += len(taken[-1].batch)
                    continue
                left = due - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            self._queued -= size
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            live = [r for r in taken if r.future.set_running_or_notify_cancel()]
            if not live:
                continue
            clock = time.perf_counter()
            try:
                features, tag = self.run(np.concatenate([r.batch for r in live]))
            except Exception as err:  # the requests of this batch fail; the service goes on
                for r in live:
                    r.future.set_exception(err)
                continue
            seconds = time.perf_counter() - clock
            size = sum(len(r.batch) for r in live)
            self._seconds_per_crop = 0.8 * self._seconds_per_crop + 0.2 * seconds / size
            if self.on_batch is not None:
                self.on_batch(size, seconds)
            start = 0
            for r in live:
                r.future.set_result((features[start : start + len(r.batch)], tag))
                start += len(r.batch)

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)
