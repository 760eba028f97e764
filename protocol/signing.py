"""Ed25519 signatures on control messages, verified against the federation's keyring.

A signed message travels as an envelope (JSON)::

    {"schema_version": 1, "kind": "signed", "signer": "<identity>",
     "payload": "<base64 of the inner message's exact JSON bytes>", "signature": "<base64 Ed25519>"}

The signature covers the inner bytes exactly as sent, so any client that can produce and check Ed25519
signatures interoperates, whatever its JSON serialiser. Binary chunk messages are not signed: the
whole blob's sha256 is inside a signed manifest (update, round, deployment), and a receiver only
accepts chunks of a blob announced by a verified manifest.

Beyond a valid signature, the signer must be allowed to speak on the topic (the same rule as the broker
ACL): a site only on ``status/<itself>``, ``sites/<itself>/...``, ``global/resend`` and ``deploy/resend``;
the aggregator only on ``round``, ``deploy``, ``status/<itself>`` and the sites' ``ack`` and ``resend``
topics (`may_speak`). `Keyring.open` returns the inner bytes or raises `SignatureError`.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from protocol.messages import MAX_MESSAGE_BYTES, SCHEMA_VERSION, untrusted_json
from protocol.topics import Topics

SITE_REQUEST_LEAVES = ("global/resend", "deploy/resend")
ENVELOPE_FIELDS = {"schema_version", "kind", "signer", "payload", "signature"}


class SignatureError(ValueError):
    """A message is unsigned, badly signed, signed by an unknown identity, or off the signer's topics."""


class Signer:
    def __init__(self, identity: str, key: ed25519.Ed25519PrivateKey) -> None:
        self.identity, self.key = identity, key

    @classmethod
    def load(cls, path: Path, keyring: Keyring) -> Signer:
        """The key in `path`; its identity is the keyring entry with the matching public key."""
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise SignatureError(f"{path} is not an Ed25519 private key")
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        for name, (_, public) in keyring.identities.items():
            if public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw:
                return cls(name, key)
        raise SignatureError(
            f"{path}: this signing key is not in the keyring (revoked, or another federation)"
        )

    def wrap(self, payload: bytes) -> bytes:
        envelope = {
            "schema_version": SCHEMA_VERSION,
            "kind": "signed",
            "signer": self.identity,
            "payload": base64.b64encode(payload).decode(),
            "signature": base64.b64encode(self.key.sign(payload)).decode(),
        }
        return json.dumps(envelope, separators=(",", ":")).encode()


class Keyring:
    """identity -> (role, Ed25519 public key), from a provisioned ``keys.json``."""

    def __init__(self, identities: dict[str, tuple[str, ed25519.Ed25519PublicKey]], topics: Topics) -> None:
        self.identities, self.topics = identities, topics

    @classmethod
    def load(cls, path: Path, topics: Topics) -> Keyring:
        data = json.loads(path.read_text())
        if data.get("federation") != topics.federation:
            raise SignatureError(f"{path} is the keyring of federation {data.get('federation')!r}")
        identities = {
            name: (
                entry["role"],
                ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(entry["signing_key"])),
            )
            for name, entry in data["identities"].items()
        }
        return cls(identities, topics)

    def may_speak(self, signer: str, topic: str) -> bool:
        """Whether `signer` may publish on `topic`: a site on its own status and `sites/<itself>/...` and
        the two shared request topics; the aggregator on what it publishes (`round`, `deploy`, its status,
        any site's `ack` and `resend`), never on what sites publish: the envelope does not name its topic,
        so a site could replay the aggregator's signed request for its chunks on `deploy/resend` as the
        aggregator's own (2026-12-05 insider audit)."""
        role, _ = self.identities[signer]
        root = self.topics.root + "/"
        if not topic.startswith(root):
            return False
        leaf = topic[len(root) :]
        if role == "aggregator":
            site_leaf = topic.rsplit("/", 1)[1] if self.topics.site_of(topic) is not None else None
            return leaf in ("round", "deploy", f"status/{signer}") or site_leaf in ("ack", "resend")
        return (
            leaf == f"status/{signer}" or leaf.startswith(f"sites/{signer}/") or leaf in SITE_REQUEST_LEAVES
        )

    def open(self, payload: bytes, topic: str) -> tuple[str, bytes]:
        """(signer, inner message bytes) of a valid envelope on `topic`, else SignatureError."""
        if len(payload) > MAX_MESSAGE_BYTES * 2:
            raise SignatureError(f"signed message of {len(payload)} bytes is too large")
        try:
            envelope = untrusted_json(payload)
        except ValueError as err:
            raise SignatureError(f"not a signed message (not JSON: {err})") from None
        if not isinstance(envelope, dict) or envelope.get("kind") != "signed":
            raise SignatureError("unsigned message")
        version = envelope.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise SignatureError(f"signed envelope: unsupported schema_version {version!r}")
        if set(envelope) != ENVELOPE_FIELDS:  # (as every message: unknown fields are an error)
            odd = sorted(set(envelope) ^ ENVELOPE_FIELDS)
            raise SignatureError(f"signed envelope: missing or unknown field {odd[0][:64]!r}")
        signer = envelope.get("signer")
        if not isinstance(signer, str) or signer not in self.identities:
            raise SignatureError(f"signed by an unknown identity {signer!r}")
        try:
            inner = base64.b64decode(envelope["payload"], validate=True)
            signature = base64.b64decode(envelope["signature"], validate=True)
            self.identities[signer][1].verify(signature, inner)
        except (KeyError, TypeError, binascii.Error, InvalidSignature):
            raise SignatureError(f"invalid signature (signer {signer})") from None
        if not self.may_speak(signer, topic):
            raise SignatureError(f"{signer} may not publish on {topic}")
        return signer, inner
