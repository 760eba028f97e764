"""Federated-by-camera clients (`cloud-aggregator split --by camera`): each client holds exactly one
camera's training images of its site, evaluates on the whole site's query/gallery, and reads back through
the same readers as any site, whatever the source layout."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image
from typer.testing import CliRunner

from cloud.cli import app
from reid.data import DatasetLayoutError, read_dataset
from reid.data.camera_split import split_by_camera


def test_every_camera_of_every_site_becomes_a_client(tiny_federation, tmp_path):
    sites = sorted((tiny_federation / "sites").iterdir())
    result = CliRunner().invoke(
        app, ["split", "--data", str(tiny_federation / "sites"), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "split.json").read_text())
    clients = {c["name"]: c for c in manifest["clients"]}
    for site in sites:
        source = read_dataset(site)
        per_camera = Counter(r.camid for r in source.train)
        left_out = {s["camera"] for s in manifest["skipped"] if s["site"] == site.name}
        assert {c["camera"] for c in clients.values() if c["site"] == site.name} | left_out == set(per_camera)
        for camera, count in per_camera.items():
            if camera in left_out:
                continue
            client = read_dataset(tmp_path / "c" / f"{site.name}-c{camera}")
            assert len(client.train) == count and {r.camid for r in client.train} == {camera}
            got = Counter((r.pid, r.path.resolve().read_bytes()) for r in client.train)
            want = Counter((r.pid, r.path.read_bytes()) for r in source.train if r.camid == camera)
            assert got == want  # the same images with the same identities
            for split in ("query", "gallery"):  # evaluation stays on the site's whole query/gallery
                assert sorted((r.pid, r.camid) for r in getattr(client, split)) == sorted(
                    (r.pid, r.camid) for r in getattr(source, split)
                )
    assert len(clients) >= len(sites)
    again = CliRunner().invoke(
        app, ["split", "--data", str(tiny_federation / "sites"), "--out", str(tmp_path / "c")]
    )
    assert again.exit_code == 2  # an existing split is never written over


def test_a_list_file_layout_splits_into_market_named_clients(tmp_path):
    source = tmp_path / "sites" / "msmt"
    rows = {"train": [], "query": [], "gallery": []}
    for pid in range(3):
        for cam in (2, 7):
            for k in range(2):
                rel = f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg"
                (source / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 16), (pid * 40, cam * 20, k * 90)).save(source / "train" / rel)
                rows["train"].append(f"{rel} {pid}")
    for split, cam in (("query", 3), ("gallery", 12)):
        rel = f"0009/0009_000_{cam:02d}_0113noon_0001_0.jpg"
        (source / "test" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 16)).save(source / "test" / rel)
        rows[split].append(f"{rel} 9")
    lists = {
        "train": rows["train"][:-1],
        "val": rows["train"][-1:],
        "query": rows["query"],
        "gallery": rows["gallery"],
    }
    for name, lines in lists.items():
        (source / f"list_{name}.txt").write_text("\n".join(lines) + "\n")
    clients, skipped = split_by_camera([source], tmp_path / "out", copy=True, min_images=4)
    assert [(c.name, c.train_images, c.identities) for c in clients] == [("msmt-c2", 6, 3), ("msmt-c7", 6, 3)]
    assert not skipped
    c7 = read_dataset(tmp_path / "out" / "msmt-c7")
    assert c7.layout == "market1501" and {r.camid for r in c7.train} == {7}
    assert sorted(r.pid for r in c7.train) == [0, 0, 1, 1, 2, 2]
    assert (c7.query[0].pid, c7.query[0].camid, c7.gallery[0].camid) == (9, 3, 12)
    assert not (tmp_path / "out" / "msmt-c7" / "query").iterdir().__next__().is_symlink()  # --copy
    # every camera left out (6 images of 3 identities each): an error, and nothing written
    with pytest.raises(DatasetLayoutError, match="fewer than 7 training images or 2 identities"):
        split_by_camera([source], tmp_path / "strict7", min_images=7)
    assert not (tmp_path / "strict7").exists()


def test_what_split_refuses_it_refuses_before_writing_anything(tiny_federation, tmp_path):
    """One site's data set given as the folder of sites, a site folder whose name is no site id (the
    clients could not join over MQTT), and a site that cannot be read after a good one: each is one line
    naming the problem, and the output folder stays empty (a rerun works once the problem is fixed)."""
    site = tiny_federation / "sites" / "site00"

    def split(data, out, *more):
        result = CliRunner().invoke(app, ["split", "--data", str(data), "--out", str(out), *more])
        assert result.exit_code == 2, result.output
        assert not out.exists() or not any(out.iterdir())
        return " ".join(result.output.replace("│", " ").split())

    assert "is one site's data set (market1501)" in split(site, tmp_path / "a")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "Märkt 1501 (copy)").symlink_to(site)
    assert "invalid site folder name 'Märkt 1501 (copy)'" in split(tmp_path / "odd", tmp_path / "b")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a").symlink_to(site)
    (tmp_path / "two" / "b").mkdir()  # no known layout
    assert "unknown data set layout" in split(tmp_path / "two", tmp_path / "c")
    # every camera left out: it wrote a split.json of no clients and exited 0 (2026-12-04 audit)
    assert "no client to write" in split(tiny_federation / "sites", tmp_path / "d", "--min-images", "100000")
