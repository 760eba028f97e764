"""Data layouts: file-name parsing, auto-detection, errors that name the path, corrupt images."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid.data import (
    DatasetLayoutError,
    ImageDataset,
    InputSpec,
    detect_layout,
    eval_transform,
    make_loader,
    parse_image_name,
    read_dataset,
    train_transform,
)
from reid.data.images import open_rgb
from tests.conftest import png_claiming


@pytest.mark.parametrize(
    ("name", "pid", "cam"),
    [
        ("0002_c1s1_000451_03.jpg", 2, 1),  # Market-1501
        ("-1_c3s2_012345_01.jpg", -1, 3),  # Market junk
        ("0000_c6s4_002345_02.jpg", 0, 6),  # Market distractor
        ("0005_c2_f0046985.jpg", 5, 2),  # DukeMTMC-reID
        ("0012_c14_0043.jpg", 12, 14),  # MSMT17 in Market-style names: two-digit camera
        ("0001_c1_1.png", 1, 1),  # CUHK03-NP
        ("cam_1_00023_00004.png", 23, 1),  # FedReID small data sets
        ("cam_0_00107_00000.bmp", 107, 0),
    ],
)
def test_parse_image_name(name, pid, cam):
    assert parse_image_name(name) == (pid, cam)


@pytest.mark.parametrize("name", ["img_001.jpg", "c1_0001.jpg", "abcd_c1.jpg", "cam_1_x_2.jpg"])
def test_unparseable_names_are_errors(name):
    with pytest.raises(ValueError, match="cannot parse"):
        parse_image_name(name)


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (120, 30, 200)).save(path)


def _market(root: Path, names: dict[str, list[str]]) -> None:
    for folder, files in names.items():
        for f in files:
            _img(root / folder / f)


MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s1_000001_01.jpg"],
    "query": ["0010_c1s1_000100_00.jpg"],
    "bounding_box_test": ["0010_c2s1_000200_00.jpg", "0000_c1s1_000300_00.jpg", "-1_c1s1_000400_00.jpg"],
}


def test_market_layout(tmp_path):
    _market(tmp_path, MARKET)
    splits = read_dataset(tmp_path)
    assert splits.layout == "market1501"
    assert [(r.pid, r.camid) for r in splits.train] == [(2, 1), (2, 2), (7, 3)]
    assert splits.train_labels() == [0, 0, 1]
    assert sorted(r.pid for r in splits.gallery) == [0, 10]  # junk dropped, distractor kept
    assert splits.junk_dropped == 1


def test_duke_and_msmt_market_style_names(tmp_path):
    _market(
        tmp_path / "duke",
        {
            "bounding_box_train": ["0005_c2_f0046985.jpg"],
            "query": ["0011_c8_f0000001.jpg"],
            "bounding_box_test": ["0011_c1_f0000002.jpg"],
        },
    )
    _market(
        tmp_path / "msmt",
        {
            "bounding_box_train": ["0012_c14_0043.jpg"],
            "query": ["0100_c10_0001.jpg"],
            "bounding_box_test": ["0100_c15_0002.jpg"],
        },
    )
    duke = read_dataset(tmp_path / "duke")
    assert (duke.train[0].pid, duke.train[0].camid, duke.query[0].camid) == (5, 2, 8)
    msmt = read_dataset(tmp_path / "msmt")
    assert [msmt.train[0].camid, msmt.query[0].camid, msmt.gallery[0].camid] == [14, 10, 15]


def test_cuhk03_np_variants(tmp_path):
    for variant in ("detected", "labeled"):
        _market(
            tmp_path / variant,
            {
                "bounding_box_train": ["0001_c1_1.png", "0001_c2_2.png"],
                "query": ["0700_c1_1.png"],
                "bounding_box_test": ["0700_c2_1.png"] * (2 if variant == "labeled" else 1),
            },
        )
    _img(tmp_path / "labeled" / "bounding_box_test" / "0700_c2_9.png")
    assert detect_layout(tmp_path) == "cuhk03-np"
    assert len(read_dataset(tmp_path).gallery) == 1
    assert len(read_dataset(tmp_path, cuhk03_variant="labeled").gallery) == 2
    shutil.rmtree(tmp_path / "detected")  # only the labeled crops copied: they are the default then
    assert len(read_dataset(tmp_path).gallery) == 2


def test_msmt17_list_files(tmp_path):
    for split, name in [
        ("train", "0000/0000_000_01_0303morning_0015_0.jpg"),
        ("train", "0001/0001_004_14_0303noon_0100_1.jpg"),
        ("test", "0003/0003_000_03_0113morning_0001_0.jpg"),
        ("test", "0003/0003_010_12_0113noon_0500_0.jpg"),
    ]:
        _img(tmp_path / split / name)
    (tmp_path / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n")
    (tmp_path / "list_val.txt").write_text("0001/0001_004_14_0303noon_0100_1.jpg 1\n")
    (tmp_path / "list_query.txt").write_text("0003/0003_000_03_0113morning_0001_0.jpg 3\n")
    (tmp_path / "list_gallery.txt").write_text("0003/0003_010_12_0113noon_0500_0.jpg 3\n\n")
    splits = read_dataset(tmp_path)
    assert splits.layout == "msmt17"
    assert [(r.pid, r.camid) for r in splits.train] == [(0, 1), (1, 14)]
    assert (splits.query[0].camid, splits.gallery[0].camid) == (3, 12)
    assert splits.train[1].path.is_file()
    (tmp_path / "list_query.txt").write_text("garbage\n")
    with pytest.raises(DatasetLayoutError, match=r"list_query\.txt:1"):
        read_dataset(tmp_path)


def test_msmt17_v2_folders_and_what_a_partial_copy_is_told(tmp_path):
    """MSMT17_V2 keeps its images in mask_train_v2/ and mask_test_v2/ under the same list files; a missing
    list or listed images that are not on disk are one-line errors naming the file (were tracebacks, or
    a run whose every image was "corrupt")."""
    listed = {
        "list_train.txt": ("train", "0000/0000_000_01_0303morning_0015_0.jpg 0"),
        "list_query.txt": ("test", "0003/0003_000_03_0113morning_0001_0.jpg 3"),
        "list_gallery.txt": ("test", "0003/0003_010_12_0113noon_0500_0.jpg 3"),
    }
    for list_name, (split, line) in listed.items():
        _img(tmp_path / f"mask_{split}_v2" / line.split()[0])
        (tmp_path / list_name).write_text(line + "\n")
    (tmp_path / "list_val.txt").write_text("")  # optional, and may be empty
    splits = read_dataset(tmp_path)
    folders = [r.path.parent.parent.name for r in (*splits.train, *splits.query)]
    assert folders == ["mask_train_v2", "mask_test_v2"]
    (tmp_path / "list_gallery.txt").write_text(listed["list_gallery.txt"][1] + "\n0004/0004_1_2_x.jpg 4\n")
    with pytest.raises(DatasetLayoutError, match=r"1 of the 2 images listed in .*list_gallery\.txt"):
        read_dataset(tmp_path)
    (tmp_path / "list_gallery.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing split list: .*list_gallery\.txt"):
        read_dataset(tmp_path)
    (tmp_path / "mask_test_v2").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetLayoutError, match=r"missing image folder: .*test"):
        read_dataset(tmp_path)


def test_hidden_files_are_not_images_and_symlinked_folders_are_followed(tmp_path):
    _market(tmp_path / "m", MARKET)
    _img(tmp_path / "m" / "bounding_box_train" / "._0002_c1s1_000451_03.jpg")  # a macOS copy's metadata
    _img(tmp_path / "m" / "query" / ".hidden.jpg")
    assert len(read_dataset(tmp_path / "m").train) == 3
    base = tmp_path / "f" / "pytorch"
    _img(tmp_path / "ids" / "7" / "cam_0_00007_00000.jpg")
    _img(base / "query" / "5" / "cam_0_00005_00000.jpg")
    _img(base / "gallery" / "5" / "cam_1_00005_00001.jpg")
    (base / "train_all").mkdir()
    (base / "train_all" / "7").symlink_to(tmp_path / "ids" / "7")  # identities linked in, not copied
    (base / "train_all" / "loop").symlink_to(base / "train_all")  # a link back up: read once
    assert [r.pid for r in read_dataset(tmp_path / "f").train] == [7]
    (base / "gallery").rename(tmp_path / "g")
    with pytest.raises(DatasetLayoutError, match=r"missing split folder: .*gallery"):
        read_dataset(tmp_path / "f")
    with pytest.raises(DatasetLayoutError, match="not a folder"):
        read_dataset(tmp_path / "ids" / "7" / "cam_0_00007_00000.jpg")


def test_fedreid_pytorch_layout_with_small_dataset_names(tmp_path):
    base = tmp_path / "viper" / "pytorch"
    _img(base / "train_all" / "0" / "cam_0_00001_00000.jpg")
    _img(base / "train_all" / "0" / "cam_1_00001_00001.jpg")
    _img(base / "train_all" / "1" / "cam_0_00002_00000.jpg")
    _img(base / "train" / "0" / "cam_0_00001_00000.jpg")
    _img(base / "query" / "5" / "cam_0_00005_00000.jpg")
    _img(base / "gallery" / "5" / "cam_1_00005_00001.jpg")
    _img(base / "gallery" / "6" / "0006_c2s1_000001_00.jpg")
    for root in (tmp_path / "viper", base):
        splits = read_dataset(root)
        assert splits.layout == "fedreid"
        assert len(splits.train) == 3  # train_all preferred over train
        assert [(r.pid, r.camid) for r in splits.gallery] == [(5, 1), (6, 2)]


def test_unknown_layout_and_empty_split_name_the_path(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DatasetLayoutError, match=re.escape(str(tmp_path / "random"))):
        read_dataset(tmp_path / "random")
    with pytest.raises(DatasetLayoutError, match="not found"):
        read_dataset(tmp_path / "missing")
    _market(tmp_path / "m", {"bounding_box_train": ["0002_c1s1_000451_03.jpg"], "query": ["0010_c1s1_0.jpg"]})
    (tmp_path / "m" / "bounding_box_test").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"no images in .*bounding_box_test"):
        read_dataset(tmp_path / "m")
    (tmp_path / "m" / "bounding_box_test" / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match="no images"):
        read_dataset(tmp_path / "m")
    _img(tmp_path / "m" / "bounding_box_test" / "photo.jpg")
    with pytest.raises(DatasetLayoutError, match=r"photo\.jpg"):
        read_dataset(tmp_path / "m")


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.jpg"
        _img(p)
        paths.append(p)
    paths[2].write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "gone.jpg").write_bytes(b"")
    paths.append(tmp_path / "gone.jpg")
    ds = ImageDataset(paths, eval_transform(InputSpec(height=32, width=16)), labels=list(range(6)))
    batches = list(make_loader(ds, batch_size=4, train=False))
    assert [len(b) for b in batches] == [3, 1]
    assert sum(b.skipped for b in batches) == 2
    assert torch.cat([b.labels for b in batches]).tolist() == [0, 1, 3, 4]
    assert "unreadable image" in caplog.text and "2.jpg" in caplog.text
    caplog.clear()
    list(make_loader(ds, batch_size=4, train=False))  # read again (every epoch): not warned again
    assert "unreadable image" not in caplog.text


def test_sixteen_bit_and_bomb_headers(tmp_path, caplog):
    """A 16-bit greyscale PNG keeps its tones (PIL's own RGB conversion makes it white); a header
    claiming 200 M pixels is skipped like any unreadable image (it raised DecompressionBombError)."""
    wide = np.linspace(0, 65535, 16 * 8).reshape(16, 8).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    rgb = np.asarray(open_rgb(tmp_path / "wide.png"))
    assert rgb.shape == (16, 8, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    np.testing.assert_array_equal(rgb[..., 0], wide >> 8)
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 10000))
    assert open_rgb(tmp_path / "bomb.png") is None
    assert "bomb.png" in caplog.text and "exceeds limit" in caplog.text


def test_eval_transforms_produce_the_configured_size():
    spec = InputSpec(height=48, width=24)
    img = Image.new("RGB", (64, 128), (10, 200, 30))
    assert train_transform(spec)(img).shape == (3, 48, 24)
    x = eval_transform(spec)(img)
    assert x.shape == (3, 48, 24)
    # normalised with ImageNet statistics: the green channel of (10,200,30) maps to (200/255-0.456)/0.224
    assert x[1].mean().item() == pytest.approx((200 / 255 - 0.456) / 0.224, abs=1e-3)


@pytest.mark.parametrize(("n", "sizes"), [(5, [5]), (8, [8]), (9, [8]), (17, [8, 8])])
def test_training_loader_drops_the_last_partial_batch_unless_the_set_is_one_batch(tmp_path, n, sizes):
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"{i}.jpg")
        _img(paths[-1])
    ds = ImageDataset(paths, eval_transform(InputSpec(height=32, width=16)), labels=[0] * n)
    assert [len(b) for b in make_loader(ds, batch_size=8, train=True, seed=0)] == sizes


def test_only_the_first_unreadable_files_are_named(tmp_path, caplog, monkeypatch):
    from reid.data import images

    monkeypatch.setattr(images, "NAMED_MAX", 2)
    monkeypatch.setattr(images, "_warned", set())
    for i in range(5):
        assert open_rgb(tmp_path / f"gone{i}.jpg") is None
    named = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(named) == 2 and "gone0.jpg" in named[0]
    assert sum("no longer named one by one" in r.getMessage() for r in caplog.records) == 1
