"""Control messages: valid documents parse, anything else is one clear MessageError."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chunks import blob_ref
from protocol.messages import (
    BlobRef,
    EvalReport,
    MessageError,
    RoundStart,
    UpdateManifest,
    encode_message,
    parse_message,
)
from protocol.topics import Topics

SHA = "a" * 64
BLOB = BlobRef(blob_id="ab" * 16, size=10, sha256=SHA, chunks=1)


def _update(**changes) -> dict:
    doc = json.loads(
        encode_message(
            UpdateManifest(
                site="s1",
                round=3,
                base_hash=SHA,
                blob=BLOB,
                n_samples=10,
                cdw=0.2,
                loss=1.5,
                train_seconds=2.0,
            )
        )
    )
    doc.update(changes)
    return doc


def test_round_trip_and_expected_kind():
    msg = parse_message(json.dumps(_update()).encode(), UpdateManifest)
    assert msg.site == "s1" and msg.blob.chunks == 1
    with pytest.raises(MessageError, match="expected a RoundStart"):
        parse_message(json.dumps(_update()).encode(), RoundStart)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps(_update(schema_version=2)).encode(), "schema_version"),
        (
            json.dumps({k: v for k, v in _update().items() if k != "schema_version"}).encode(),
            "schema_version",
        ),
        (json.dumps(_update(kind="nope")).encode(), "invalid nope"),
        (json.dumps({k: v for k, v in _update().items() if k != "kind"}).encode(), "kind"),
        (json.dumps(_update(cdw=float("nan"))).encode(), "cdw"),
        (json.dumps(_update(cdw=7)).encode(), "cdw"),
        (json.dumps(_update(loss=float("nan"))).encode(), "loss"),
        (json.dumps(_update(metrics={"rank1": float("inf")})).encode(), "metrics.rank1"),
        (json.dumps(_update(metrics={"mAP": -1.0})).encode(), "metrics.mAP"),
        (json.dumps(_update(timings={"train": float("nan")})).encode(), "timings.train"),
        (json.dumps(_update(n_samples=0)).encode(), "n_samples"),
        (json.dumps(_update(n_samples=10**400)).encode(), "n_samples"),  # (float(n) overflowed at close)
        (json.dumps(_update(n_samples=2**31)).encode(), "n_samples"),
        (json.dumps(_update(metrics={"a\nb": 1.0})).encode(), "metrics"),
        (json.dumps(_update(site="../etc")).encode(), "site"),
        (json.dumps(_update(extra=1)).encode(), "extra"),
        (json.dumps(_update(base_hash="xyz")).encode(), "base_hash"),
        (b"{" + b" " * 300_000 + b"}", "exceeds"),
        (b"[" * 200_000, "nested too deeply"),  # (json's RecursionError escaped every ValueError guard)
        # UTF-8 only: json.loads took UTF-16/32 bytes and a BOM too, which a client from the docs would not
        (json.dumps(_update()).encode("utf-16"), "utf-8"),
        (json.dumps(_update()).encode("utf-32-le"), "not JSON"),
        (b"\xef\xbb\xbf" + json.dumps(_update()).encode(), "BOM"),
        # JSON types as they are (a strict receiver would refuse what a lax one coerced; 2026-12-04 audit)
        (json.dumps(_update(schema_version=1.0)).encode(), "schema_version"),
        (json.dumps(_update(schema_version=True)).encode(), "schema_version"),
        (json.dumps(_update(n_samples=True)).encode(), "n_samples"),
        (json.dumps(_update(n_samples=10.0)).encode(), "n_samples"),
        (json.dumps(_update(round=True)).encode(), "round"),
        (json.dumps(_update(cdw="0.5")).encode(), "cdw"),
        (json.dumps(_update(dp_epsilon="1")).encode(), "dp_epsilon"),
        (json.dumps(_update(blob={**BLOB.model_dump(), "size": "10"})).encode(), "blob.size"),
    ],
)
def test_bad_messages(payload, match):
    with pytest.raises(MessageError, match=match):
        parse_message(payload)


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"rank1": 50.0}, "together"),
        ({"mAP": 50.0}, "together"),
        ({"rank1": 150.0, "mAP": 1.0}, "rank1 is a percentage"),
        ({"rank1": 50.0, "mAP": 1.0, "mINP": 1e300}, "mINP is a percentage"),
        ({"round": 1e15}, "'round' is reserved"),
        ({"site": 0.0}, "'site' is reserved"),
    ],
)
def test_an_evaluation_report_carries_both_scores_or_neither(metrics, match):
    """(A report with rank1 and no mAP raised KeyError in the aggregator's handler; an insider's metrics
    named round or site overwrote its records' keys in metrics.jsonl, which then broke `report`.) The
    same rules hold for the metrics of an update manifest."""
    doc = {"kind": "eval", "schema_version": 1, "site": "s1", "round": 2, "base_hash": SHA}
    with pytest.raises(MessageError, match=match):
        parse_message(json.dumps({**doc, "metrics": metrics}).encode(), EvalReport)
    if "together" not in match:
        with pytest.raises(ValueError, match=match):
            UpdateManifest(
                site="s1", round=2, base_hash=SHA, blob=blob_ref(b"d", 1024), n_samples=1, cdw=0.5, loss=1.0,
                train_seconds=1.0, metrics=metrics,
            )  # fmt: skip
    for fine in ({}, {"mINP": 3.0}, {"rank1": 50.0, "mAP": 40.0, "mINP": 3.0}):
        assert parse_message(json.dumps({**doc, "metrics": fine}).encode(), EvalReport).metrics == fine


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300), st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10))
    )
)
def test_fuzz_parser_raises_only_message_errors(data):
    payload = data if isinstance(data, bytes) else json.dumps({"schema_version": 1, **data}).encode()
    with contextlib.suppress(MessageError):
        parse_message(payload)


def test_topics_are_versioned_and_names_checked():
    t = Topics("fed-1")
    assert t.round == "fedreid/v1/fed-1/round"
    assert t.site("s1", "update") == "fedreid/v1/fed-1/sites/s1/update"
    assert t.site_of("fedreid/v1/fed-1/sites/s1/update") == "s1"
    assert t.site_of("fedreid/v1/other/sites/s1/update") is None
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ValueError):
            t.site(bad, "update")


def test_the_largest_chunk_request_fits_a_control_message_signed_or_not():
    """A request for 100,000 indices did not fit the 256 KiB limit (726 KB signed): every receiver
    refused it, and a large transfer that lost its chunks could never be asked for again."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from protocol.messages import MAX_MESSAGE_BYTES, MAX_REQUEST_INDICES, ChunkRequest
    from protocol.signing import Keyring, Signer

    req = ChunkRequest.first_of("aggregator", "ab" * 32, list(range(99_999_999 - 40_000, 99_999_999)))
    assert len(req.indices) == MAX_REQUEST_INDICES
    payload = encode_message(req)
    assert len(payload) <= MAX_MESSAGE_BYTES and parse_message(payload) == req
    key = ed25519.Ed25519PrivateKey.generate()
    topics = Topics("big")
    keyring = Keyring({"aggregator": ("aggregator", key.public_key())}, topics)
    signer, inner = keyring.open(Signer("aggregator", key).wrap(payload), topics.site("s1", "resend"))
    assert signer == "aggregator" and parse_message(inner) == req


def test_the_largest_round_start_fits_a_control_message():
    """`selected` allowed 10,000 names: with long names the RoundStart was 660 KB, refused by every site
    (a round nobody could read). As many sites as a round names, with the longest names, each listed
    again in one of 64 groups, fit."""
    from protocol.messages import (
        MAX_MESSAGE_BYTES,
        MAX_SELECTED,
        GroupBase,
        ModelInfo,
        RoundStart,
        TrainingInfo,
    )

    names = [f"{i:04d}".ljust(64, "x") for i in range(MAX_SELECTED)]
    ref = BLOB.model_copy(update={"sha256": "a" * 64})
    groups = [GroupBase(group=g, base_hash="a" * 64, blob=ref, sites=names[g::64]) for g in range(64)]
    start = RoundStart(
        federation="f" * 64, round=10**9, base_hash="a" * 64, blob=ref, model=ModelInfo(arch="resnet50"),
        training=TrainingInfo(), deadline=1e10, selected=names, run_id="ab" * 16, groups=groups,
    )  # fmt: skip
    payload = encode_message(start)
    assert len(payload) <= MAX_MESSAGE_BYTES and parse_message(payload) == start
    with pytest.raises(ValueError, match="selected"):
        RoundStart(**{**start.model_dump(), "groups": [], "selected": [*names, "one-more"]})
