"""The round's admission rule on its own (no broker, no disk): every reason a manifest is refused, the
duplicate that is acknowledged again, and the manifest that is collected."""

from __future__ import annotations

import hashlib

from cloud.round import OpenRound, admit, update_limit
from protocol.chunks import blob_ref
from protocol.messages import UpdateManifest

BASE = hashlib.sha256(b"global model").hexdigest()


def _round(limit: int = 10_000) -> OpenRound:
    ref = blob_ref(b"global model", 1024)
    return OpenRound(3, ["a", "b"], BASE, b"global model", ref, 0.0, 0.0, False, None, limit)


def _manifest(site: str = "a", round_: int = 3, base: str = BASE, blob: bytes = b"delta") -> UpdateManifest:
    return UpdateManifest(
        site=site, round=round_, base_hash=base, blob=blob_ref(blob, 1024), n_samples=10, cdw=1.0, loss=0.5,
        train_seconds=1.0,
    )  # fmt: skip


def test_admission_names_every_reason_and_collects_the_rest():
    cur = _round()
    assert admit(cur, "a", _manifest()) is None
    assert admit(None, "a", _manifest())[0] == "no_round"
    assert admit(cur, "b", _manifest("a"))[0] == "wrong_site"
    kind, why = admit(cur, "a", _manifest(round_=2))
    assert (kind, why) == ("no_round", "stale round 2 (current round 3)")
    assert admit(cur, "a", _manifest(base="0" * 64))[0] == "wrong_base"
    assert admit(cur, "c", _manifest("c"))[0] == "not_selected"
    assert admit(cur, "a", _manifest(blob=b"x" * 20_000))[0] == "bad_manifest"  # over the round's limit
    cur.accepted["a"] = _manifest()
    assert admit(cur, "a", _manifest()) == ("duplicate", "")  # acknowledged again, not collected
    assert admit(cur, "a", _manifest(blob=b"another delta"))[0] == "conflict"
    cur.train = False
    assert admit(cur, "b", _manifest("b"))[0] == "evaluation_round"


def test_the_update_limit_fits_the_whole_model_with_framing_unless_the_setting_is_lower():
    limit = update_limit(1_000_000, 10, 1 << 30)
    assert 1_000_000 + 10 * 256 < limit < 1_100_000  # a full fp32 delta with int8 scales fits; 10 % more not
    assert update_limit(1_000_000, 10, 500_000) == 500_000
