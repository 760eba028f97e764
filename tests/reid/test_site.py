"""SiteData: query and gallery crops and the BatchNorm statistics' views are read once and kept; a camera's
crops are a subset of the whole."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import reid.site
from reid.data import InputSpec
from reid.model import ModelSpec, build_model
from reid.site import SiteData

TINY_INPUT = InputSpec(height=64, width=32)


def _corrupt_query_and_gallery(site: SiteData) -> None:
    for record in [*site.splits.query, *site.splits.gallery, *site.splits.train]:
        record.path.write_bytes(b"not an image")


def _batches(site: SiteData) -> list[torch.Tensor]:
    return [batch.images for batch in site.statistics_loader()]


def test_evaluation_crops_are_read_once_and_a_cameras_crops_are_rows_of_the_whole(tiny_federation, tmp_path):
    shutil.copytree(tiny_federation / "sites" / "site01", tmp_path / "site")
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet18"), 1)
    site = SiteData(tmp_path / "site", TINY_INPUT, batch_size=8)
    first, views = site.embed(model), _batches(site)
    _corrupt_query_and_gallery(site)  # kept in memory: the files are not read again
    again = site.embed(model)
    assert torch.equal(first.query, again.query) and torch.equal(first.gallery, again.gallery)
    assert len(views) > 1 and all(torch.equal(a, b) for a, b in zip(views, _batches(site), strict=True))
    assert np.array_equal(first.gallery_pids, again.gallery_pids)

    camera = int(first.gallery_cams[0])
    one = site.embed(model, cameras={camera})
    rows = first.gallery_cams == camera
    assert 0 < len(one.gallery) < len(first.gallery) and set(one.gallery_cams.tolist()) == {camera}
    assert torch.allclose(one.gallery, first.gallery[torch.from_numpy(rows)], atol=1e-6)
    assert np.array_equal(one.gallery_pids, first.gallery_pids[rows])


@pytest.mark.parametrize("budget", ["none", "the query's"])
def test_crops_over_the_memory_budget_are_read_from_disk_every_time(
    tiny_federation, tmp_path, monkeypatch, budget
):
    shutil.copytree(tiny_federation / "sites" / "site01", tmp_path / "site")
    model = build_model(ModelSpec(arch="resnet18"), 1)
    site = SiteData(tmp_path / "site", TINY_INPUT, batch_size=8)
    query_bytes = len(site.splits.query) * 3 * 64 * 32 * 4  # one site's budget, for all its sets together
    monkeypatch.setattr(reid.site, "KEEP_BYTES", 0 if budget == "none" else query_bytes)
    site.embed(model)
    assert _batches(site)
    _corrupt_query_and_gallery(site)
    with pytest.raises(ValueError, match=r"site: none of the .* (query|gallery) images can be read"):
        site.embed(model)
    assert all(len(images) == 0 for images in _batches(site))  # every view unreadable now
    # a round's failure names the folder ("ValueError: no readable image" did not say where)
    with pytest.raises(ValueError, match=f"{tmp_path / 'site'}: none of the .* training images can be read"):
        site.cdw_images()
