"""The held-out validation split (`reid.data.validation_split.hold_out`): settings are chosen on training
identities the model never trains on, and the sites' test query/gallery are never read."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from reid.data import read_dataset
from reid.data.validation_split import hold_out


def test_held_out_identities_leave_training_and_form_a_cross_camera_query_gallery(tiny_federation, tmp_path):
    sites = sorted((tiny_federation / "sites").iterdir())
    written = hold_out(sites, tmp_path / "v", fraction=0.25, seed=3)
    assert [w.name for w in written] == [s.name for s in sites]
    manifest = {m["site"]: m for m in json.loads((tmp_path / "v" / "validation.json").read_text())["sites"]}
    for site, folder in zip(sites, written, strict=True):
        source, val = read_dataset(site), read_dataset(folder)
        held = set(manifest[site.name]["held_out"])
        source_pids = {r.pid for r in source.train}
        assert held < source_pids and len(held) == max(2, round(0.25 * len(source_pids)))
        # training keeps exactly the other identities' images, image for image
        got = Counter((r.pid, r.camid, r.path.resolve().read_bytes()) for r in val.train)
        want = Counter((r.pid, r.camid, r.path.read_bytes()) for r in source.train if r.pid not in held)
        assert got == want
        # the gallery is exactly the held-out identities' training images: no test image is read
        test_bytes = {r.path.read_bytes() for r in [*source.query, *source.gallery]}
        held_images = [r for r in source.train if r.pid in held]
        assert Counter((r.pid, r.camid, r.path.resolve().read_bytes()) for r in val.gallery) == Counter(
            (r.pid, r.camid, r.path.read_bytes()) for r in held_images
        )
        assert not {r.path.resolve().read_bytes() for r in [*val.query, *val.gallery]} & test_bytes
        # all against all: every image of an identity seen by two cameras is a query, none other
        seen_twice = {p for p in held if len({r.camid for r in held_images if r.pid == p}) > 1}
        assert Counter((r.pid, r.camid, r.path.resolve().read_bytes()) for r in val.query) == Counter(
            (r.pid, r.camid, r.path.read_bytes()) for r in held_images if r.pid in seen_twice
        )
        assert val.query and len(val.query) == manifest[site.name]["query"]
        for q in val.query:  # every query can be matched in another camera
            assert any(g.pid == q.pid and g.camid != q.camid for g in val.gallery), (site.name, q)
    # seeded: the same seed holds out the same identities, another seed others
    again = hold_out(sites, tmp_path / "again", fraction=0.25, seed=3)
    assert all(read_dataset(a).query for a in again)
    other = json.loads((tmp_path / "again" / "validation.json").read_text())["sites"]
    assert [m["held_out"] for m in other] == [manifest[s.name]["held_out"] for s in sites]
    hold_out(sites, tmp_path / "other", fraction=0.25, seed=4)
    differs = json.loads((tmp_path / "other" / "validation.json").read_text())["sites"]
    assert [m["held_out"] for m in differs] != [m["held_out"] for m in other]


def test_impossible_splits_are_refused_with_the_reason(tiny_federation, tmp_path):
    sites = sorted((tiny_federation / "sites").iterdir())
    with pytest.raises(ValueError, match="fraction"):
        hold_out(sites, tmp_path / "a", fraction=1.0)
    with pytest.raises(ValueError, match="cannot spare"):
        hold_out(sites, tmp_path / "b", fraction=0.25, min_ids=10_000)
    hold_out(sites, tmp_path / "c")
    with pytest.raises(FileExistsError, match="not empty"):
        hold_out(sites, tmp_path / "c")


def test_distractors_put_the_training_identities_in_the_gallery_and_change_nothing_else(
    tiny_federation, tmp_path
):
    sites = sorted((tiny_federation / "sites").iterdir())
    plain = hold_out(sites, tmp_path / "plain", fraction=0.25, seed=3)
    hard = hold_out(sites, tmp_path / "hard", fraction=0.25, seed=3, distractors=True)
    assert json.loads((tmp_path / "hard" / "validation.json").read_text())["distractors"] is True

    def images(records) -> Counter:
        return Counter((r.pid, r.camid, r.path.resolve().read_bytes()) for r in records)

    for a, b in zip(plain, hard, strict=True):
        before, after = read_dataset(a), read_dataset(b)
        assert images(after.train) == images(before.train) and images(after.query) == images(before.query)
        assert images(after.gallery) == images(before.gallery) + images(before.train)
        assert {r.pid for r in after.query}.isdisjoint(r.pid for r in after.train)
