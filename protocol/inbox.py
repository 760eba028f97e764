"""The queue between paho's network thread and an endpoint's worker thread, shaped so that no sender can
bury the messages of others under a flood.

* State-like topics (status documents, the round document, the deployment manifest, a site's update
  manifest) keep only their newest message: however many arrive while the worker is busy, each topic
  holds one slot and the worker sees the latest (``Topics.is_state``).
* Requests (the resend topics, ``Topics.is_request``) may be pending at most `max_requests` at a time;
  more are dropped (a requester asks again after its idle time).
* Everything else (chunks, acks, run-end, evaluation reports) is kept in arrival order, within a byte
  budget: at most `max_topic_bytes` waiting per topic (`max_chunk_topic_bytes` for a chunk topic; a
  message always fits an empty topic) and `max_bytes` in all. A message over the budget is dropped and
  counted in a warning (once per 10 s): a lost chunk is asked for again by its receiver's resend, so a
  sender that floods its own topic loses its own messages, and memory stays bounded.

A topic other than chunks that brings more than `flood_per_10s` messages in 10 s is named in a warning
(once per 10 s): a site flooding faster than this node's MQTT client reads delays every message behind
it at the broker, which mosquitto cannot rate-limit (docs/security.md: revoke the site).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from protocol.topics import Topics

log = logging.getLogger(__name__)

Item = tuple[str, bytes, bool]  # topic, payload, retained


class Inbox:
    def __init__(
        self,
        topics: Topics,
        max_requests: int = 256,
        flood_per_10s: int = 2000,
        max_topic_bytes: int = 8 << 20,
        max_chunk_topic_bytes: int = 256 << 20,
        max_bytes: int = 1 << 30,
    ) -> None:
        self.topics = topics
        self.max_requests = max_requests
        self.flood_per_10s = flood_per_10s
        self.max_topic_bytes, self.max_chunk_topic_bytes, self.max_bytes = (
            max_topic_bytes,
            max_chunk_topic_bytes,
            max_bytes,
        )
        self._bytes: collections.Counter[str] = collections.Counter()  # waiting bytes per ordered topic
        self._total = 0
        self._over: collections.Counter[str] = collections.Counter()  # dropped over budget since the warning
        self._last_over = 0.0
        self._counts: collections.Counter[str] = collections.Counter()
        self._window = time.monotonic()
        self._order: collections.deque[tuple[str, Item | None]] = collections.deque()
        self._latest: dict[str, Item] = {}
        self._requests = 0
        self._dropped = 0
        self._last_warning = 0.0
        self._ready = threading.Condition()

    def put(self, topic: str, payload: bytes, retained: bool) -> None:
        item = (topic, payload, retained)
        with self._ready:
            self._count(topic)
            if self.topics.is_state(topic):
                if topic not in self._latest:
                    self._order.append((topic, None))
                self._latest[topic] = item  # a newer one replaces the one still waiting
            elif self.topics.is_request(topic):
                if self._requests >= self.max_requests:
                    self._drop()
                    return
                self._requests += 1
                self._order.append((topic, item))
            else:
                if not self._fits(topic, len(payload)):
                    self._drop_over(topic)
                    return
                self._bytes[topic] += len(payload)
                self._total += len(payload)
                self._order.append((topic, item))
            self._ready.notify()

    def _fits(self, topic: str, size: int) -> bool:
        waiting = self._bytes[topic]
        limit = self.max_chunk_topic_bytes if self.topics.is_chunks(topic) else self.max_topic_bytes
        return (waiting == 0 or waiting + size <= limit) and (
            self._total == 0 or self._total + size <= self.max_bytes
        )

    def _drop_over(self, topic: str) -> None:
        self._over[topic] += 1
        now = time.monotonic()
        if now - self._last_over > 10:
            log.warning(
                "inbox over its byte budget: dropped %s (a chunk is asked for again; a sender flooding "
                "its topic loses its own messages)",
                ", ".join(f"{n} on {t}" for t, n in self._over.most_common(5)),
            )
            self._over.clear()
            self._last_over = now

    def _count(self, topic: str) -> None:
        if self.topics.is_chunks(topic):
            return
        now = time.monotonic()
        if now - self._window > 10:
            for name, n in self._counts.items():
                if n > self.flood_per_10s:
                    log.warning("flood: %d messages on %s in %.0f s", n, name, now - self._window)
            self._counts.clear()
            self._window = now
        self._counts[topic] += 1

    def _drop(self) -> None:
        self._dropped += 1
        now = time.monotonic()
        if now - self._last_warning > 10:
            log.warning(
                "request flood: %d requests dropped (at most %d wait)", self._dropped, self.max_requests
            )
            self._last_warning, self._dropped = now, 0

    def close(self) -> None:
        """Makes `get` return None once the queue is empty."""
        with self._ready:
            self._order.append(("", None))
            self._ready.notify()

    def get(self) -> Item | None:
        with self._ready:
            while not self._order:
                self._ready.wait()
            topic, item = self._order.popleft()
            if item is None:
                return self._latest.pop(topic) if topic in self._latest else None
            if self.topics.is_request(topic):
                self._requests -= 1
            elif not self.topics.is_state(topic):
                self._bytes[topic] -= len(item[1])
                self._total -= len(item[1])
                if not self._bytes[topic]:
                    del self._bytes[topic]
            return item

    def __len__(self) -> int:
        with self._ready:
            return len(self._order)
