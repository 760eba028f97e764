"""Answering chunk requests (`ChunkRequest` on ``global/resend`` and ``deploy/resend``) so that they are
cheap to ask and expensive to abuse.

A request is checked on the message thread (parse, signer = requester, the owner's own check of blob and
requester) and only queued there; a separate thread publishes. Per requester, at most one request per
`min_interval_s` is taken; requests are coalesced (one publish of the union of the wanted chunks serves
every requester), and one blob is published at most once per `min_interval_s` whatever the number of
requesters: a flood, even with forged requester names, costs at most one blob per interval and never
blocks the message thread. Each requester may ask for COPIES whole copies of one blob, then for one more
per REFILL_S: the chunks go to every site on the shared topic, so a site that asked for the whole global
model every interval (within the rate limit) made every site download it every 2 s.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from protocol.messages import ChunkRequest, MessageError, parse_message
from protocol.mqtt import Endpoint

log = logging.getLogger(__name__)

_MAX_TRACKED = 4096  # requesters remembered for the rate limit (older entries are forgotten first)
COPIES = 4.0  # whole copies of one blob a requester may ask for at once ...
REFILL_S = 3600.0  # ... and one more copy per this many seconds


class ChunkResender:
    """Serves the chunks of the blobs `blob_of` names on `topic`.

    `chunks_for(request)` is the owner's check: the chunk count of the requested blob if this requester
    may have it, else None (request dropped). `blob_of(blob_id)` gives the blob's bytes at publish time,
    or None when it is no longer served (e.g. the round moved on).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        topic: str,
        chunk_bytes: int,
        chunks_for: Callable[[ChunkRequest], int | None],
        blob_of: Callable[[str], bytes | None],
        min_interval_s: float,
        what: str,
    ) -> None:
        self.endpoint, self.topic, self.chunk_bytes = endpoint, topic, chunk_bytes
        self.chunks_for, self.blob_of = chunks_for, blob_of
        self.min_interval_s, self.what = min_interval_s, what
        self.lock = threading.Lock()
        self.wanted: dict[str, set[int]] = {}
        self.last_request: dict[str, float] = {}
        self.last_sent: dict[str, float] = {}
        # (requester, blob) -> [chunks it may still ask for, when counted, told it is over budget]
        self.budget: dict[tuple[str, str], list] = {}
        self.taken: dict[str, float] = {}  # requester -> when a request of it was last taken (monotonic)
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"resend-{what}", daemon=True)
        self.published = 0  # chunks published (for tests and logs)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.ready.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def on_request(self, topic: str, payload: bytes) -> None:
        """Message-thread handler: validate and queue; never publishes here."""
        try:
            req = parse_message(payload, ChunkRequest)
        except MessageError as err:
            log.warning("dropped chunk request for the %s: %s", self.what, err)
            return
        signer = self.endpoint.signer_of_message
        if signer is not None and signer != req.requester:
            log.warning(
                "dropped chunk request for the %s: signed by %s for requester %s",
                self.what,
                signer,
                req.requester,
            )
            return
        count = self.chunks_for(req)
        if count is None:
            return
        outside = sum(1 for i in req.indices if not 0 <= i < count)
        if outside:  # (the rest of the request is served)
            log.warning(
                "chunk request of %s for the %s: %d indices outside 0-%d ignored",
                req.requester,
                self.what,
                outside,
                count - 1,
            )
        indices = {i for i in req.indices if 0 <= i < count}
        now = time.monotonic()
        with self.lock:
            if now - self.last_request.get(req.requester, -math.inf) < self.min_interval_s:
                log.debug("%s chunk request of %s dropped (rate limit)", self.what, req.requester)
                return
            _forget_oldest(self.last_request, lambda when: when)
            self.last_request[req.requester] = now
            if not self._within_budget(req.requester, req.blob_id, count, len(indices), now):
                return
            _forget_oldest(self.taken, lambda when: when)
            self.taken[req.requester] = now
            self.wanted.setdefault(req.blob_id, set()).update(indices)
        self.ready.set()

    def last_taken(self, requester: str) -> float:
        """When a request of `requester` was last taken (within the rate limit and its budget)."""
        with self.lock:
            return self.taken.get(requester, -math.inf)

    def _within_budget(self, requester: str, blob_id: str, count: int, asked: int, now: float) -> bool:
        """(under the lock) Whether `requester` may have `asked` more chunks of a blob of `count`."""
        _forget_oldest(self.budget, lambda entry: entry[1])
        entry = self.budget.setdefault((requester, blob_id), [COPIES * count, now, False])
        entry[0] = min(COPIES * count, entry[0] + count * (now - entry[1]) / REFILL_S)
        entry[1] = now
        if asked <= entry[0]:
            entry[0] -= asked
            entry[2] = False
            return True
        if not entry[2]:
            entry[2] = True
            log.warning(
                "%s asked for more than %.0f copies of the %s: its requests wait for its budget (one copy "
                "per %.0f s)",
                requester,
                COPIES,
                self.what,
                REFILL_S,
            )
        return False

    def _run(self) -> None:
        while not self.stopping.is_set():
            if not self.ready.wait(0.5):
                continue
            self.ready.clear()
            with self.lock:
                wanted, self.wanted = self.wanted, {}
            for blob_id, indices in wanted.items():
                wait = self.last_sent.get(blob_id, -math.inf) + self.min_interval_s - time.monotonic()
                if wait > 0 and self.stopping.wait(wait):
                    return
                with self.lock:  # requests that came while waiting are served by this publish too
                    indices |= self.wanted.pop(blob_id, set())
                blob = self.blob_of(blob_id)
                if blob is None or not indices:
                    continue
                log.info("resending %d chunks of the %s", len(indices), self.what)
                try:
                    self.published += self.endpoint.publish_blob(
                        self.topic, blob, blob_id, self.chunk_bytes, indices
                    )
                except TimeoutError as err:
                    log.warning("resend of the %s interrupted: %s", self.what, err)
                self.last_sent[blob_id] = time.monotonic()


def _forget_oldest(table: dict, when: Callable) -> None:
    """Keep `table` within _MAX_TRACKED entries: the older half (by `when(value)`) goes."""
    if len(table) >= _MAX_TRACKED:
        for key, _ in sorted(table.items(), key=lambda kv: when(kv[1]))[: _MAX_TRACKED // 2]:
            del table[key]
