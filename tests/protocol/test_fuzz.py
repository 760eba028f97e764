"""Structure-aware fuzzing of every decoder that reads network input: valid encodings of each message
kind, chunk and blob encoding are mutated (bytes flipped, inserted, deleted, truncated, JSON values
swapped); the decoder either accepts or raises its own documented error, never anything else."""

from __future__ import annotations

import contextlib
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.chunks import ChunkError, Reassembler, parse_chunk, split_blob
from protocol.codec import CodecError, decode_state, encode_state
from protocol.messages import (
    BlobRef,
    ChunkRequest,
    Deployment,
    EvalReport,
    MessageError,
    ModelInfo,
    NodeStatus,
    RoundStart,
    RunEnd,
    TrainingInfo,
    UpdateAck,
    UpdateManifest,
    encode_message,
    parse_message,
)

SHA = "c" * 64
REF = BlobRef(blob_id="cd" * 16, size=3000, sha256=SHA, chunks=3, encoding="fp16")
VALID = [
    NodeStatus(node="site-1", role="site", state="training", round=4, time=1.0, deployed="f/round-3"),
    RoundStart(
        federation="f",
        round=2,
        base_hash=SHA,
        blob=REF,
        model=ModelInfo(arch="resnet18"),
        training=TrainingInfo(),
        deadline=2.0,
        selected=["a", "b"],
    ),
    RunEnd(federation="f", rounds=3),
    UpdateManifest(
        site="a", round=2, base_hash=SHA, blob=REF, n_samples=5, cdw=0.5, loss=1.0, train_seconds=1.0
    ),
    EvalReport(site="a", round=3, base_hash=SHA, metrics={"rank1": 50.0, "mAP": 40.0}),
    UpdateAck(site="a", round=2, blob_id=REF.blob_id, accepted=False, reason="stale"),
    ChunkRequest(requester="a", blob_id=REF.blob_id, indices=[0, 2]),
    Deployment(federation="f", version="f/round-2", round=2, blob=REF, contract={"sha256": SHA}, created=3.0),
]
VALID_BYTES = [encode_message(m) for m in VALID]


def mutate(data: bytes, draw) -> bytes:
    """A few random edits of `data`: flips, inserts, deletions, truncation."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if not out:
            break
        at = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        else:
            del out[at:]
    return bytes(out)


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 5), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID_BYTES), st.data())
def test_fuzz_mutated_messages_raise_only_message_errors(valid, data):
    with contextlib.suppress(MessageError):
        parse_message(mutate(valid, data.draw))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID_BYTES), st.data())
def test_fuzz_messages_with_swapped_field_values(valid, data):
    doc = json.loads(valid)
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(JSON_VALUES)
    if data.draw(st.booleans()):
        doc[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    with contextlib.suppress(MessageError):
        message = parse_message(json.dumps(doc).encode())
        assert message.schema_version == 1  # whatever passes is a validated model


BLOB = bytes(range(256)) * 10  # 2560 bytes in 3 chunks of 1000
CHUNKS = list(split_blob(BLOB, "ab" * 16, 1000))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CHUNKS), st.data())
def test_fuzz_mutated_chunks_raise_only_chunk_errors_and_never_corrupt_a_blob(valid, data):
    """A mutated chunk is rejected, or (if the edit hit nothing checked) assembles into the right blob."""
    try:
        header, payload = parse_chunk(mutate(valid, data.draw))
    except ChunkError:
        return
    transfer = Reassembler(parse_chunk(CHUNKS[0])[0])
    with contextlib.suppress(ChunkError):
        transfer.add(header, payload)
        for chunk in CHUNKS:
            transfer.add(*parse_chunk(chunk))
        assert transfer.result() == BLOB  # the whole-blob sha256 would have caught anything else
    transfer.close()


STATE = {
    "conv.weight": np.linspace(-1, 1, 300, dtype=np.float32).reshape(10, 30),
    "bn.running_var": np.ones(10, dtype=np.float32),
    "bn.num_batches_tracked": np.array(7, dtype=np.int64),
}
BLOBS = [encode_state(STATE, enc, compress=z) for enc in ("fp32", "fp16", "int8") for z in (False, True)]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(BLOBS), st.data())
def test_fuzz_mutated_blobs_raise_only_codec_errors(valid, data):
    with contextlib.suppress(CodecError):
        decoded = decode_state(mutate(valid, data.draw))
        for arr in decoded.values():  # whatever decodes is finite and of a supported dtype
            assert arr.dtype in (np.float32, np.int64, np.int32, np.int16, np.uint8, np.int8, np.bool_)
            if arr.dtype == np.float32:
                assert np.isfinite(arr).all()
