"""The round on its own (no broker, no disk): every reason a manifest is refused, the
duplicate that is acknowledged again, the manifest that is collected, and the progress line."""

from __future__ import annotations

import hashlib
import json

import pytest

from cloud.config import ServeConfig
from cloud.journal import Journal
from cloud.round import OpenRound, admit, update_limit
from cloud.strategy import StrategyConfig
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
    assert admit(None, "a", _manifest(round_=2), closed=2) == ("no_round", "stale round 2 (round 2 closed)")
    assert admit(cur, "b", _manifest("a"))[0] == "wrong_site"
    kind, why = admit(cur, "a", _manifest(round_=2))
    assert (kind, why) == ("no_round", "stale round 2 (current round 3)")
    assert admit(cur, "a", _manifest(round_=4)) == ("no_round", "future round 4 (current round 3)")
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


def test_a_run_written_before_a_strategy_setting_existed_resumes_at_what_it_ran(tmp_path):
    """run.json of an earlier version lacks settings added since: it resumes when they are at the value
    that version ran (strategy.fednova off), and is another run otherwise."""
    journal = Journal(tmp_path / "fed")
    plain = ServeConfig(federation="fed", strategy=StrategyConfig(fednova=False))
    journal.check_identity(plain.identity(), ServeConfig.stored_identity)
    path = tmp_path / "fed" / "run.json"
    stored = json.loads(path.read_text())
    del stored["strategy"]["fednova"]
    path.write_text(json.dumps(stored))
    journal.check_identity(plain.identity(), ServeConfig.stored_identity)  # resumes
    with pytest.raises(ValueError, match="another run configuration"):
        journal.check_identity(plain.identity())  # compared as written, it is not the same
    for other in (
        ServeConfig(federation="fed", strategy=StrategyConfig(fednova=True)),
        ServeConfig(federation="fed", strategy=StrategyConfig(fednova=False, bn="average")),
        ServeConfig(federation="other", strategy=StrategyConfig(fednova=False)),
    ):
        with pytest.raises(ValueError, match="another run configuration"):
            journal.check_identity(other.identity(), ServeConfig.stored_identity)
    path.write_text(json.dumps({"federation": "fed", "strategy": {"no_such_setting": 1}}))
    with pytest.raises(ValueError, match="another run configuration"):
        journal.check_identity(plain.identity(), ServeConfig.stored_identity)
    # a [strategy] table of today sets its keys over the shipped default (fednova on), not the library's
    partial = ServeConfig.model_validate({"federation": "fed", "strategy": {"bn": "average"}})
    assert partial.strategy.fednova and partial.strategy.bn == "average"
    assert ServeConfig().strategy.fednova and not StrategyConfig().fednova


def test_the_progress_line_says_what_each_waiting_site_does():
    cur = _round()
    cur.manifests["a"] = _manifest()
    assert cur.doing({"b": ("training", cur.number)}) == ["a uploading 0/1 chunks", "b training"]
    cur.accepted["a"] = cur.manifests.pop("a")
    assert cur.doing({}) == ["b offline"]  # no status yet
    assert cur.doing({"b": ("online", None)}) == ["b online, not started yet"]  # fetching, or idle
    # its last status is about a round that closed without it (a site stopped while training it): it
    # was said to be training this one (2026-12-05 chaos check)
    assert cur.doing({"b": ("training", cur.number - 1)}) == [f"b still on round {cur.number - 1}"]
    cur.train = False
    assert cur.doing({"b": ("training", cur.number)}) == ["b evaluating"]  # the evaluation round's work
