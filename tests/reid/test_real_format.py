"""Real-format robustness on a fixture the project makes itself: Market-1501-named JPEGs (some with an
EXIF orientation, as phone-made crops are), a site split by camera (no query has a cross-camera match)
and a site smaller than one batch. Each must train and evaluate; `extract --flip` with the exported
model gives the features `evaluate` scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cloud.cli import app as cloud_app
from edge.cli import app as edge_app
from export.gallery import Gallery
from reid.data import InputSpec, eval_transform, make_loader
from reid.data.images import open_rgb
from reid.data.loading import ImageDataset
from reid.evaluate import extract_features
from reid.weights import load_checkpoint
from tests.reid.test_model_files import _train

runner = CliRunner()
SIZE = ["--height", "64", "--width", "32"]


def _crop(pid: int, cam: int, k: int) -> Image.Image:
    rng = np.random.default_rng(pid * 1000 + cam * 10 + k)
    base = np.array([pid * 37 % 255, pid * 91 % 255, pid * 53 % 255], np.float32)
    pixels = np.clip(base + rng.normal(0, 25, (64, 32, 3)), 0, 255).astype(np.uint8)
    pixels[: 20 + pid % 10] = np.clip(255 - base, 0, 255).astype(np.uint8)  # "upper body" colour
    return Image.fromarray(pixels)


def _market_site(root: Path, train_ids: int, query_cam: int | None, rotated: bool = False) -> Path:
    """bounding_box_train / query / bounding_box_test with Market-1501 names. `query_cam`: every query and
    gallery crop from that one camera (a camera-split site), else queries on c1 and gallery on c2."""
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True)
    for pid in range(1, train_ids + 1):
        for k, cam in enumerate((1, 2, 1)):
            _crop(pid, cam, k).save(root / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg")
    for pid in range(101, 105):
        q_cam, g_cam = (query_cam, query_cam) if query_cam else (1, 2)
        query = _crop(pid, q_cam, 0)
        path = root / "query" / f"{pid:04d}_c{q_cam}s1_000000_00.jpg"
        if rotated:  # stored sideways with EXIF orientation 6 ("rotate 90 CW to view")
            exif = Image.Exif()
            exif[0x0112] = 6
            query.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
        else:
            query.save(path)
        for k in range(2):
            _crop(pid, g_cam, k + 1).save(
                root / "bounding_box_test" / f"{pid:04d}_c{g_cam}s1_{k + 1:06d}_00.jpg"
            )
    return root


def test_exif_orientation_is_applied(tmp_path):
    site = _market_site(tmp_path / "site", 2, None, rotated=True)
    query = sorted((site / "query").iterdir())[0]
    with Image.open(query) as raw:
        assert raw.size == (64, 32)  # stored sideways
    upright = open_rgb(query)
    assert upright is not None and upright.size == (32, 64)


def test_camera_split_and_tiny_sites_train_and_evaluate(tmp_path, caplog):
    one_camera = _market_site(tmp_path / "one-camera", 4, query_cam=3)
    tiny = _market_site(tmp_path / "tiny", 2, None)  # 6 training images, batch 32
    for site in (one_camera, tiny):
        args = ["train", "--data", str(site), "--arch", "resnet18", *SIZE, "--out", str(tmp_path / site.name)]
        result = runner.invoke(edge_app, args)
        assert result.exit_code == 0, result.output
        result = runner.invoke(
            edge_app, ["evaluate", "--data", str(site), "--model", str(tmp_path / site.name)]
        )
        assert result.exit_code == 0, result.output
    assert "no valid queries in" in caplog.text and "one-camera" in caplog.text
    assert "fewer than one batch of 32" in caplog.text
    # the simulator takes both as sites of one federation
    sites = tmp_path / "sites"
    sites.mkdir()
    for site in (one_camera, tiny):
        (sites / site.name).symlink_to(site)
    out = tmp_path / "sim"
    args = ["simulate", "--data", str(sites), "--out", str(out), "--rounds", "1", "--arch", "resnet18", *SIZE]
    result = runner.invoke(cloud_app, [*args, "--transport", "none"])
    assert result.exit_code == 0, result.output
    lines = (out / "metrics.jsonl").read_text()
    assert '"site": "one-camera"' in lines and '"valid_queries": 0.0' in lines


@pytest.mark.parametrize("flip", [False, True])
def test_extract_gives_the_features_evaluate_scores(tmp_path, flip):
    site = _market_site(tmp_path / "site", 4, None, rotated=True)
    trained = _train(site, tmp_path / "trained")
    onnx = tmp_path / "m.onnx"
    args = ["export", "--model", str(trained), "--images", str(site / "query"), "--out", str(onnx)]
    result = runner.invoke(cloud_app, args)
    assert result.exit_code == 0, result.output
    npz = tmp_path / "f.npz"
    args = ["extract", "--model", str(onnx), "--images", str(site / "query"), "--out", str(npz)]
    result = runner.invoke(edge_app, [*args, *(["--flip"] if flip else [])])
    assert result.exit_code == 0, result.output
    extracted = Gallery.load(npz)
    ckpt = load_checkpoint(trained)
    paths = sorted((site / "query").iterdir())
    loader = make_loader(ImageDataset(paths, eval_transform(InputSpec(height=64, width=32))), 8, train=False)
    feats, idx = extract_features(ckpt.model, loader, flip=flip)
    ours = {paths[i].name: feats[j] for j, i in enumerate(idx)}
    for name, feature in zip(extracted.names, extracted.features, strict=True):
        cosine = float(torch.dot(ours[Path(name).name], torch.from_numpy(feature)))
        assert cosine > 0.9999, (name, cosine)
