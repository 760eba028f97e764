"""Chunking: split/parse, reassembly with missing, duplicate, reordered, corrupt and foreign chunks."""

from __future__ import annotations

import contextlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunks import (
    ChunkError,
    ForeignChunk,
    InboundBlob,
    Reassembler,
    blob_ref,
    parse_chunk,
    split_blob,
)


def _blob(n: int = 10_000) -> bytes:
    return os.urandom(n)


def test_reordered_and_duplicate_chunks_reassemble_exactly():
    blob = _blob()
    messages = list(split_blob(blob, "ab" * 16, chunk_size=999))
    assert len(messages) == 11
    random.Random(0).shuffle(messages)
    header, _data = parse_chunk(messages[0])
    r = Reassembler(header)
    for m in messages + messages[:3]:
        r.add(*parse_chunk(m))
    assert r.complete and r.result() == blob


def test_missing_chunks_are_listed_and_can_be_resent():
    blob = _blob()
    messages = list(split_blob(blob, "cd" * 16, chunk_size=1000))
    r = Reassembler(parse_chunk(messages[0])[0])
    for i, m in enumerate(messages):
        if i not in (3, 7):
            r.add(*parse_chunk(m))
    assert not r.complete and r.missing() == [3, 7]
    with pytest.raises(ChunkError, match="missing"):
        r.result()
    for i in r.missing():
        r.add(*parse_chunk(messages[i]))
    assert r.result() == blob


def test_corrupt_foreign_and_malformed_chunks_are_rejected():
    blob = _blob()
    messages = list(split_blob(blob, "ef" * 16, chunk_size=1000))
    corrupt = bytearray(messages[2])
    corrupt[-1] ^= 0xFF
    with pytest.raises(ChunkError, match="sha256"):
        parse_chunk(bytes(corrupt))
    with pytest.raises(ChunkError, match="magic"):
        parse_chunk(b"hello world")
    with pytest.raises(ChunkError, match="header length"):
        parse_chunk(b"FRC1\xff\xff\xff\xff")
    with pytest.raises(ChunkError, match="bad chunk header"):
        parse_chunk(b"FRC1\x00\x00\x00\x02{}")
    with pytest.raises(ChunkError, match="nested too deeply"):  # (was a RecursionError)
        parse_chunk(b"FRC1\x00\x00\x0f\xa0" + b"[" * 4000)
    for index in ('"0"', "0.0", "true"):  # "a JSON integer": nothing is coerced
        head_len = int.from_bytes(messages[0][4:8], "big")
        header = messages[0][8 : 8 + head_len].replace(b'"index":0', b'"index":' + index.encode())
        assert header != messages[0][8 : 8 + head_len]
        with pytest.raises(ChunkError, match="bad chunk header"):
            parse_chunk(b"FRC1" + len(header).to_bytes(4, "big") + header + messages[0][8 + head_len :])
    truncated = messages[1][:-10]
    with pytest.raises(ChunkError, match="bytes, expected"):
        parse_chunk(truncated)
    r = Reassembler(parse_chunk(messages[0])[0])
    other = next(iter(split_blob(_blob(), "12" * 16, chunk_size=1000)))
    with pytest.raises(ChunkError, match="disagrees"):
        r.add(*parse_chunk(other))


def test_an_inbound_blob_checks_chunks_against_its_announcement(tmp_path):
    blob = _blob(5000)
    ref = blob_ref(blob, 1000)
    messages = list(split_blob(blob, ref.blob_id, chunk_size=1000))
    inbound = InboundBlob(ref, spool_bytes=0, spool_dir=tmp_path)
    assert inbound.missing() == [0, 1, 2, 3, 4] and inbound.received() == 0 and not inbound.complete
    with pytest.raises(ChunkError, match="no chunk"):
        inbound.result()
    # the same id, but another size: the header agrees with itself, not with the announcement
    liar = next(iter(split_blob(_blob(6000), ref.blob_id, chunk_size=1000)))
    with pytest.raises(ForeignChunk, match="another size"):
        inbound.add(*parse_chunk(liar))
    assert inbound.received() == 0 and list(tmp_path.iterdir()) == []  # nothing kept for it
    for m in messages[1:]:
        assert inbound.add(*parse_chunk(m))
    assert not inbound.add(*parse_chunk(messages[1]))  # a duplicate
    # the same blob cut at another chunk size (the same count; its sender restarted with other settings):
    # the newest cut wins, and it completes (a ChunkError here failed the whole transfer, for good)
    resized = list(split_blob(blob, ref.blob_id, chunk_size=1200))
    assert inbound.add(*parse_chunk(resized[0])) and inbound.received() == 1
    for m in resized[1:]:
        inbound.add(*parse_chunk(m))
    assert inbound.complete and inbound.result() == blob
    inbound = InboundBlob(ref, spool_bytes=0, spool_dir=tmp_path)
    for m in messages[1:]:
        inbound.add(*parse_chunk(m))
    assert inbound.missing() == [0] and inbound.received() == 4 and inbound.idle_seconds() < 5
    inbound.add(*parse_chunk(messages[0]))
    assert inbound.complete and inbound.result() == blob
    inbound.close()
    with pytest.raises(ChunkError, match="exceeds"):  # the receiver's limit, before anything is kept
        InboundBlob(ref, max_bytes=4000)
    with pytest.raises(ChunkError, match="chunks for"):  # an announcement of more chunks than bytes allow
        InboundBlob(ref.model_copy(update={"chunks": 10**12}))


def test_oversize_blob_is_refused_and_large_blobs_spool_to_disk(tmp_path):
    blob = _blob(50_000)
    messages = list(split_blob(blob, "aa" * 16, chunk_size=4096))
    with pytest.raises(ChunkError, match="exceeds"):
        Reassembler(parse_chunk(messages[0])[0], max_bytes=10_000)
    r = Reassembler(parse_chunk(messages[0])[0], spool_bytes=1000, spool_dir=tmp_path)
    for m in reversed(messages):
        r.add(*parse_chunk(m))
    assert r.result() == blob
    r.close()


def test_a_tampered_whole_blob_fails_its_hash():
    blob = _blob(3000)
    messages = list(split_blob(blob, "bb" * 16, chunk_size=1000))
    forged = list(split_blob(blob[:1000] + b"x" * 1000 + blob[2000:], "bb" * 16, chunk_size=1000))
    header = parse_chunk(messages[0])[0]
    r = Reassembler(header)
    r.add(*parse_chunk(messages[0]))
    r.add(*parse_chunk(messages[2]))
    forged_header, data = parse_chunk(forged[1])
    r.add(forged_header.model_copy(update={"blob_sha256": header.blob_sha256}), data)
    with pytest.raises(ChunkError, match="fails its sha256"):
        r.result()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_chunk_parser_raises_only_chunk_errors(data):
    for payload in (data, b"FRC1" + data):
        with contextlib.suppress(ChunkError):
            parse_chunk(payload)


def test_a_pending_update_is_cut_as_its_manifest_announced_whatever_the_chunk_size_now():
    """An agent restarted with another chunk_bytes while an update was pending sent chunks of another
    count than its manifest: every one was dropped, and the update never arrived. It is cut to the
    announced count (the configured size when that gives it), and those chunks reassemble it."""
    from protocol.chunks import chunk_size_for

    for size in (0, 1, 1023, 1024, 1025, 2000, 65536, 100_000, 1_000_003):
        blob = os.urandom(size)
        for announced in (1024, 1500, 4096, 65536, 1 << 20):
            ref = blob_ref(blob, announced)
            for now in (1024, 3000, 65536, 1 << 20, 8 << 20):
                cut = chunk_size_for(ref, now)
                assert cut >= 1024 and (cut == now or max(1, -(-size // now)) != ref.chunks)
                chunks = [parse_chunk(c) for c in split_blob(blob, ref.blob_id, cut)]
                assert len(chunks) == ref.chunks, (size, announced, now)
                r = Reassembler(chunks[0][0])
                for header, data in chunks:
                    r.add(header, data)
                assert r.result() == blob
