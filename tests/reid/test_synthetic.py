"""The synthetic federation: deterministic, non-IID, disjoint identities, readable as Market-1501."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from reid.data import read_dataset, read_image_folder
from reid.synthetic import SyntheticConfig, cached_federation, generate_federation, site_plan, total_images

from ..conftest import TINY


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, tiny_federation):
    generate_federation(TINY, tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(tiny_federation)
    generate_federation(TINY.model_copy(update={"seed": 8}), tmp_path / "other")
    other = _digest(tmp_path / "other")
    same = set(other.items()) & set(_digest(tiny_federation).items())
    assert not same


def test_sites_are_readable_disjoint_and_unequal(tiny_federation):
    manifest = json.loads((tiny_federation / "federation.json").read_text())
    pids_per_site, train_sizes = [], []
    for entry in manifest["sites"]:
        splits = read_dataset(tiny_federation / "sites" / entry["name"])
        assert splits.layout == "market1501"
        assert len(splits.train) == entry["train_images"]
        assert splits.junk_dropped > 0 or entry["gallery_images"] < 40
        ids = {r.pid for r in splits.train} | {r.pid for r in splits.query} | {r.pid for r in splits.gallery}
        ids.discard(0)
        pids_per_site.append(ids)
        train_sizes.append(len(splits.train))
        assert not {r.pid for r in splits.train} & {r.pid for r in splits.query}  # test ids are unseen
        for q in splits.query:  # every query has a true match on another camera
            assert any(g.pid == q.pid and g.camid != q.camid for g in splits.gallery)
        assert any(g.pid == 0 for g in splits.gallery)
    for i, a in enumerate(pids_per_site):
        for b in pids_per_site[i + 1 :]:
            assert not a & b
    assert max(train_sizes) / min(train_sizes) >= TINY.size_ratio * 0.7
    public = read_image_folder(tiny_federation / "public")
    assert len(public) == TINY.public_images
    assert Image.open(public[0]).size == (TINY.width, TINY.height)
    assert total_images(TINY) >= sum(1 for _ in tiny_federation.rglob("*.jpg"))


def test_default_plan_spreads_sizes_twenty_fold_and_cameras():
    plan = site_plan(SyntheticConfig())
    sizes = [ids * per_id for ids, per_id, _ in plan]
    assert sizes == sorted(sizes, reverse=True)
    assert 15 <= sizes[0] / sizes[-1] <= 25
    assert plan[0][2] > plan[-1][2] >= 2


def test_refuses_to_overwrite(tiny_federation):
    with pytest.raises(FileExistsError):
        generate_federation(TINY, tiny_federation)


def test_identity_appearance_persists_across_cameras(tiny_federation):
    """Images of one identity are closer in colour than images of different identities (learnable)."""
    import numpy as np

    splits = read_dataset(tiny_federation / "sites" / "site00")
    by_pid: dict[int, list[np.ndarray]] = {}
    for r in splits.train:
        img = np.asarray(Image.open(r.path).convert("RGB"), dtype=np.float32)
        h = img.shape[0]
        centre = img[h // 4 : 3 * h // 4, img.shape[1] // 3 : 2 * img.shape[1] // 3]
        by_pid.setdefault(r.pid, []).append(centre.reshape(-1, 3).mean(0))
    means = {pid: np.stack(v) for pid, v in by_pid.items()}
    within = np.mean([np.linalg.norm(v - v.mean(0), axis=1).mean() for v in means.values()])
    centres = np.stack([v.mean(0) for v in means.values()])
    between = np.linalg.norm(centres[:, None] - centres[None], axis=2)[
        np.triu_indices(len(centres), 1)
    ].mean()
    assert between > 1.3 * within


def test_domains_make_sites_differ_as_data_sets_do(tmp_path):
    cfg = SyntheticConfig(
        seed=3,
        sites=4,
        train_images_max=120,
        public_images=0,
        height=96,
        width=48,
        domains=True,
        min_queries=50,
    )
    summaries = generate_federation(cfg, tmp_path / "a")
    sizes, cameras = set(), []
    for s in summaries:
        splits = read_dataset(tmp_path / "a" / "sites" / s.name)
        size = {Image.open(r.path).size for r in splits.train + splits.query + splits.gallery}
        assert len(size) == 1  # one crop size per site: the site's own
        (w, h), d = size.pop(), s.domain
        assert (w, h) == (d["width"], d["height"]) and 1.7 <= h / w <= 3.1 and 48 <= h <= 96
        sizes.add((w, h))
        assert {r.camid for r in splits.train + splits.gallery} == set(range(1, d["cameras"] + 1))
        cameras.append(d["cameras"])
        assert len(splits.query) >= 50  # one query is at most 2 rank-1 points at every site
        per_id = {r.pid: 0 for r in splits.train}
        for r in splits.train:
            per_id[r.pid] += 1
        assert set(per_id.values()) == {d["images_per_id"]}
    assert len(sizes) >= 3 and all(2 <= c <= 6 for c in cameras)
    manifest = json.loads((tmp_path / "a" / "federation.json").read_text())
    assert manifest["sites"][0]["domain"] == summaries[0].domain  # documented with the data
    again = generate_federation(cfg, tmp_path / "b")  # seeded: the same bytes again
    assert [s.domain for s in again] == [s.domain for s in summaries]
    first = sorted((tmp_path / "a" / "sites" / "site01" / "query").iterdir())[0]
    assert (tmp_path / "b" / "sites" / "site01" / "query" / first.name).read_bytes() == first.read_bytes()


def test_a_cached_federation_is_reused_regenerated_when_incomplete_and_refused_when_other(tmp_path):
    cfg = TINY.model_copy(update={"sites": 2, "train_images_max": 40, "public_images": 0})
    out = tmp_path / "cache"
    assert cached_federation(cfg, out) == out
    first = _digest(out)
    marker = out / "sites" / "site00" / "kept.txt"
    marker.write_text("a file the cache keeps")
    cached_federation(cfg, out)  # complete and of these settings: reused as it is
    assert marker.is_file() and _digest(out) == first
    (out / "federation.json").unlink()  # a generation stopped before its last write
    cached_federation(cfg, out)
    assert not marker.exists() and _digest(out) == first and (out / "federation.json").is_file()
    with pytest.raises(FileExistsError, match="other settings"):
        cached_federation(cfg.model_copy(update={"seed": 9}), out)
    assert _digest(out) == first
