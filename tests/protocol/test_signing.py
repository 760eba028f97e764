"""Ed25519 envelopes: valid ones open; tampered, unsigned, unknown-signer and off-topic ones do not."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from protocol.messages import RunEnd, encode_message, parse_message
from protocol.signing import Keyring, SignatureError, Signer
from protocol.topics import Topics

T = Topics("fed")


@pytest.fixture
def identities(tmp_path):
    keys = {name: ed25519.Ed25519PrivateKey.generate() for name in ("aggregator", "site-a", "site-b")}
    raw = {
        n: base64.b64encode(
            k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        for n, k in keys.items()
    }
    ring = {
        "federation": "fed",
        "identities": {
            n: {"role": "aggregator" if n == "aggregator" else "site", "signing_key": raw[n].decode()}
            for n in keys
        },
    }
    (tmp_path / "keys.json").write_text(json.dumps(ring))
    for n, k in keys.items():
        pem = k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (tmp_path / f"{n}.key").write_bytes(pem)
    keyring = Keyring.load(tmp_path / "keys.json", T)
    return keyring, {n: Signer.load(tmp_path / f"{n}.key", keyring) for n in keys}, tmp_path


def test_valid_envelopes_open_to_the_exact_inner_bytes(identities):
    keyring, signers, _ = identities
    inner = encode_message(RunEnd(federation="fed", rounds=3))
    signer, opened = keyring.open(signers["aggregator"].wrap(inner), T.round)
    assert signer == "aggregator" and opened == inner and parse_message(opened) == parse_message(inner)
    assert keyring.open(signers["site-a"].wrap(b"{}"), T.site("site-a", "update"))[0] == "site-a"
    assert keyring.open(signers["site-a"].wrap(b"{}"), T.status("site-a"))[0] == "site-a"
    assert keyring.open(signers["site-b"].wrap(b"{}"), T.deploy_resend)[0] == "site-b"
    assert signers["site-b"].identity == "site-b"  # found in the keyring by its public key


@pytest.mark.parametrize(
    "case, reason",
    [
        ("unsigned", "unsigned message"),
        ("not_json", "not JSON"),
        ("nested_too_deeply", "nested too deeply"),
        ("schema_version_2", "unsupported schema_version 2"),
        ("no_schema_version", "unsupported schema_version None"),
        ("unknown_field", "unknown field 'via'"),
        ("tampered_payload", "invalid signature"),
        ("tampered_signature", "invalid signature"),
        ("bad_base64", "invalid signature"),
        ("unknown_signer", "unknown identity"),
        ("forged_signer_name", "invalid signature"),
        ("site_as_other_site", "may not publish"),
        ("site_announcing_a_round", "may not publish"),
        ("site_deploying_a_model", "may not publish"),
    ],
)
def test_bad_envelopes_are_refused(identities, case, reason):
    keyring, signers, _ = identities
    inner = encode_message(RunEnd(federation="fed", rounds=3))
    good = json.loads(signers["site-a"].wrap(inner))
    topic = T.site("site-a", "update")
    payload: bytes
    if case == "unsigned":
        payload = inner
    elif case == "not_json":
        payload = b"\xff\x00garbage"
    elif case == "nested_too_deeply":  # (json raised RecursionError: it stopped a node's message thread)
        payload = b"[" * 300_000
    elif case == "schema_version_2":
        payload = json.dumps({**good, "schema_version": 2}).encode()
    elif case == "no_schema_version":
        payload = json.dumps({k: v for k, v in good.items() if k != "schema_version"}).encode()
    elif case == "unknown_field":  # (every message refuses unknown fields, the envelope too)
        payload = json.dumps({**good, "via": "relay"}).encode()
    elif case == "tampered_payload":
        payload = json.dumps(
            {**good, "payload": base64.b64encode(inner.replace(b"3", b"4")).decode()}
        ).encode()
    elif case == "tampered_signature":
        sig = bytearray(base64.b64decode(good["signature"]))
        sig[0] ^= 1
        payload = json.dumps({**good, "signature": base64.b64encode(bytes(sig)).decode()}).encode()
    elif case == "bad_base64":
        payload = json.dumps({**good, "signature": "***"}).encode()
    elif case == "unknown_signer":
        payload = json.dumps({**good, "signer": "mallory"}).encode()
    elif case == "forged_signer_name":  # site-a's signature, claiming to be the aggregator
        payload = json.dumps({**good, "signer": "aggregator"}).encode()
        topic = T.round
    elif case == "site_as_other_site":
        payload, topic = signers["site-a"].wrap(inner), T.site("site-b", "update")
    elif case == "site_announcing_a_round":
        payload, topic = signers["site-a"].wrap(inner), T.round
    else:
        payload, topic = signers["site-a"].wrap(inner), T.deploy
    with pytest.raises(SignatureError, match=reason):
        keyring.open(payload, topic)


def test_a_node_named_chunks_or_resend_is_a_node_like_any_other(identities, tmp_path):
    """Chunk and request topics are exact topics, not suffixes: the status of a site named `chunks` went
    out unsigned and was opened unchecked (a docs-only receiver dropped it; a broker could forge it),
    and `status/resend` counted as a request topic."""
    from protocol.mqtt import Endpoint

    for name in ("chunks", "resend"):
        assert not T.is_chunks(T.status(name)) and not T.is_request(T.status(name))
    assert all(T.is_chunks(t) for t in (T.global_chunks, T.deploy_chunks, T.site("chunks", "chunks")))
    assert all(T.is_request(t) for t in (T.global_resend, T.deploy_resend, T.site("resend", "resend")))
    assert not T.is_chunks(T.site("chunks", "update")) and not T.is_chunks("fedreid/v1/other/global/chunks")
    # a node named chunks signs its status, and a receiver verifies it
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ring = {
        "federation": "fed",
        "identities": {"chunks": {"role": "site", "signing_key": base64.b64encode(public).decode()}},
    }
    (tmp_path / "keys.json").write_text(json.dumps(ring))
    site = Endpoint("mqtt://127.0.0.1:1", T, "chunks", "site")  # (never connects)
    site.signer = Signer("chunks", key)
    sealed = site._status("online")
    assert json.loads(sealed)["kind"] == "signed"
    signer, inner = Keyring.load(tmp_path / "keys.json", T).open(sealed, T.status("chunks"))
    assert signer == "chunks" and parse_message(inner).node == "chunks"


def test_a_key_outside_the_keyring_and_another_federation_are_refused(identities, tmp_path_factory):
    keyring, _, folder = identities
    stranger = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path_factory.mktemp("k") / "stranger.key"
    path.write_bytes(
        stranger.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(SignatureError, match="not in the keyring"):
        Signer.load(path, keyring)
    with pytest.raises(SignatureError, match="keyring of federation"):
        Keyring.load(folder / "keys.json", Topics("other"))


def test_the_aggregator_speaks_only_on_its_own_topics(identities):
    """An envelope does not name its topic: the aggregator's signed request for a site's missing chunks
    (on `sites/<site>/resend`) replayed by that site on `deploy/resend` must not count as the aggregator's
    own request there (2026-12-05 insider audit: it drew chunks past the site's own copy budget)."""
    keyring, signers, _ = identities
    signed = signers["aggregator"].wrap(b"{}")
    own = (T.round, T.deploy, T.status("aggregator"), T.site("site-a", "ack"), T.site("site-a", "resend"))
    for topic in own:
        assert keyring.open(signed, topic)[0] == "aggregator"
    for topic in (
        T.deploy_resend,
        T.global_resend,
        T.site("site-a", "update"),
        T.site("site-a", "eval"),
        T.status("site-a"),
        "other/round",
    ):
        with pytest.raises(SignatureError, match="may not publish"):
            keyring.open(signed, topic)
