"""Chunk requests through a real mosquitto: answered, coalesced, rate-limited per requester, and one blob
per interval at most even when a flood forges a new requester name in every request."""

from __future__ import annotations

import json
import os
import time

from protocol.chunks import parse_chunk
from protocol.mqtt import Endpoint
from protocol.resend import ChunkResender
from protocol.topics import Topics
from tests.protocol.test_transport import _wait

BLOB_ID = "ab" * 16
CHUNK = 1024
BLOB = os.urandom(10 * CHUNK)


def _request(requester: str, indices: list[int], blob_id: str = BLOB_ID) -> bytes:
    doc = {
        "schema_version": 1,
        "kind": "resend",
        "requester": requester,
        "blob_id": blob_id,
        "indices": indices,
    }
    return json.dumps(doc).encode()


def test_requests_are_answered_coalesced_and_bounded_under_a_forged_flood(mosquitto_url, caplog):
    topics = Topics("resend")
    got: list[int] = []
    asked: list[str] = []

    def chunks_for(req):
        asked.append(req.requester)
        return 10 if req.blob_id == BLOB_ID else None

    server = Endpoint(mosquitto_url, topics, "srv", "aggregator", announce=False)
    resender = ChunkResender(server, topics.global_chunks, CHUNK, chunks_for, lambda b: BLOB, 1.0, "blob")
    server.handlers[topics.global_resend] = resender.on_request
    client = Endpoint(
        mosquitto_url,
        topics,
        "cli",
        "site",
        {topics.global_chunks: lambda t, p: got.append(parse_chunk(p)[0].index)},
        announce=False,
    )
    server.start()
    client.start()
    resender.start()
    try:
        assert _wait(lambda: server.connected.is_set() and client.connected.is_set())
        client.publish(topics.global_resend, _request("site-a", [3, 4, 999, -1]))
        assert _wait(lambda: sorted(got) == [3, 4])  # the rest is served, and what is not is said
        assert "chunk request of site-a for the blob: 2 indices outside 0-9 ignored" in caplog.text
        client.publish(topics.global_resend, _request("site-a", [5]))  # same requester within 1 s: dropped
        client.publish(topics.global_resend, _request("site-b", [9], blob_id="cd" * 16))  # not served
        time.sleep(1.5)
        assert sorted(got) == [3, 4]
        # a flood with a forged requester in every request: every chunk, 300 times, within ~1 s
        start = time.monotonic()
        for i in range(300):
            client.client.publish(topics.global_resend, _request(f"forged-{i}", list(range(10))), qos=0)
        assert _wait(lambda: len(asked) >= 302)  # the message thread kept up with the flood
        handled_in = time.monotonic() - start
        time.sleep(2.5)
        flood_chunks = len(got) - 2
        elapsed = time.monotonic() - start
        # one blob per started interval at most, whatever the number of requesters
        assert 10 <= flood_chunks <= 10 * (int(elapsed / 1.0) + 1), (flood_chunks, elapsed)
        assert handled_in < 10
        assert resender.published == len(got)
    finally:
        resender.stop()
        client.stop()
        server.stop()


def test_a_requester_gets_a_few_copies_of_a_blob_then_one_per_refill(mosquitto_url, caplog, monkeypatch):
    """An insider that held the round open and asked for the whole global model every 2 s (within the
    rate limit) made the broker push it to every site every 2 s: 31 copies in a 62 s round (2026-12-04
    audit). A requester gets COPIES copies of one blob, then one per REFILL_S; others are still served."""
    from protocol import resend

    monkeypatch.setattr(resend, "REFILL_S", 10.0)  # (one more chunk a second for this 10-chunk blob)
    topics = Topics("budget")
    got: list[int] = []
    server = Endpoint(mosquitto_url, topics, "srv", "aggregator", announce=False)
    resender = ChunkResender(server, topics.global_chunks, CHUNK, lambda r: 10, lambda b: BLOB, 0.05, "blob")
    server.handlers[topics.global_resend] = resender.on_request
    on_chunk = {topics.global_chunks: lambda t, p: got.append(parse_chunk(p)[0].index)}
    client = Endpoint(mosquitto_url, topics, "cli", "site", on_chunk, announce=False)
    server.start()
    client.start()
    resender.start()
    try:
        assert _wait(lambda: server.connected.is_set() and client.connected.is_set())
        for _ in range(8):
            client.publish(topics.global_resend, _request("insider", list(range(10))))
            time.sleep(0.1)
        time.sleep(0.5)
        assert len(got) == resend.COPIES * 10  # four copies, not eight
        client.publish(topics.global_resend, _request("honest", [0, 1]))
        assert _wait(lambda: len(got) == resend.COPIES * 10 + 2)
        warned = [r for r in caplog.records if "copies of the blob" in r.getMessage()]
        assert len(warned) == 1 and warned[0].getMessage().startswith("insider asked for more than 4 copies")
        time.sleep(1.5)  # over 2 chunks of budget back since the 4th copy: a request for 2 is served
        client.publish(topics.global_resend, _request("insider", [5, 6]))
        assert _wait(lambda: len(got) == resend.COPIES * 10 + 4)
    finally:
        resender.stop()
        client.stop()
        server.stop()
