"""Readers for the on-disk layouts of person-ReID data sets, with auto-detection.

Supported layouts (see docs/datasets.md):

* ``market1501``: ``bounding_box_train/ query/ bounding_box_test/`` with names ``PPPP_cC...``. This also
  reads DukeMTMC-reID (``0005_c2_f0046985.jpg``), MSMT17 converted to Market-style names (two-digit
  cameras such as ``0012_c14_...`` are camera 14) and one CUHK03-NP variant folder.
* ``cuhk03-np``: a root holding ``detected/`` and/or ``labeled/``, each in Market layout.
* ``msmt17``: ``train/ test/`` (MSMT17_V2: ``mask_train_v2/ mask_test_v2/``) plus
  ``list_{train,val,query,gallery}.txt``.
* ``fedreid``: the FedReID preprocessed layout ``pytorch/{train_all|train, query, gallery}/<id>/``,
  including the small-data-set names ``cam_<v>_<id5>_<idx5>.<ext>``.

pid -1 images are junk and are dropped at load time (equivalent to removing them from every ranking);
pid 0 images are distractors and stay in the gallery. Hidden files (``.*``, among them macOS's ``._*``
copies of every image) are not images; symlinked folders are followed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
Layout = Literal["market1501", "cuhk03-np", "msmt17", "fedreid"]
Split = Literal["train", "query", "gallery"]

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
_SMALL_NAME = re.compile(r"^cam_(\d+)_(\d+)_(\d+)$")
_MSMT_NAME = re.compile(r"^\d+_\d+_(\d+)_")


class DatasetLayoutError(ValueError):
    """The folder is not a readable ReID data set; the message names the path."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    path: Path
    pid: int
    camid: int


@dataclass(frozen=True)
class ReIDSplits:
    """The three splits of one site's data set."""

    root: Path
    layout: Layout
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    junk_dropped: int = 0

    @property
    def num_train_ids(self) -> int:
        return len({r.pid for r in self.train})

    def train_labels(self) -> list[int]:
        """Contiguous class indices 0..C-1 for the training pids (sorted by pid)."""
        index = {pid: i for i, pid in enumerate(sorted({r.pid for r in self.train}))}
        return [index[r.pid] for r in self.train]


def parse_image_name(name: str) -> tuple[int, int]:
    """(pid, camera) from a Market-style (``0002_c1s1_...``, ``0012_c14_...``) or small-data-set name
    (``cam_<v>_<id5>_<idx5>.<ext>``). Raises ValueError for anything else."""
    stem = Path(name).stem
    small = _SMALL_NAME.match(stem)
    if small:
        return int(small.group(2)), int(small.group(1))
    market = _MARKET_NAME.match(stem)
    if market:
        return int(market.group(1)), int(market.group(2))
    raise ValueError(f"cannot parse person id and camera from file name {name!r}")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    """The image files in `folder` (and below it with `recursive`, following symlinked folders once each)."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if _is_image(p))
    found, seen = [], set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [p for name in files if _is_image(p := Path(here) / name)]
    return sorted(found)


def _read_named_folder(folder: Path, recursive: bool = False) -> tuple[list[ImageRecord], int]:
    if not folder.is_dir():
        raise DatasetLayoutError(f"missing split folder: {folder}")
    paths = _images_in(folder, recursive)
    if not paths:
        raise DatasetLayoutError(f"no images in {folder}")
    records, junk = [], 0
    for path in paths:
        try:
            pid, cam = parse_image_name(path.name)
        except ValueError as err:
            raise DatasetLayoutError(f"{path}: {err}") from None
        if pid == -1:
            junk += 1
            continue
        records.append(ImageRecord(path, pid, cam))
    if not records:
        raise DatasetLayoutError(f"{folder} holds only junk images (pid -1)")
    return records, junk


def _read_train(folder: Path, need_train: bool, recursive: bool = False) -> tuple[list[ImageRecord], int]:
    """The training split; without `need_train` (a validation set: query and gallery) it may be absent."""
    if not need_train and not folder.exists():
        return [], 0
    return _read_named_folder(folder, recursive)


def _read_market(root: Path, need_train: bool = True) -> ReIDSplits:
    train, j1 = _read_train(root / "bounding_box_train", need_train)
    query, j2 = _read_named_folder(root / "query")
    gallery, j3 = _read_named_folder(root / "bounding_box_test")
    return ReIDSplits(root, "market1501", train, query, gallery, j1 + j2 + j3)


def _read_fedreid(root: Path, need_train: bool = True) -> ReIDSplits:
    base = root / "pytorch" if (root / "pytorch").is_dir() else root
    train_dir = base / "train_all" if (base / "train_all").is_dir() else base / "train"
    train, j1 = _read_train(train_dir, need_train, recursive=True)
    query, j2 = _read_named_folder(base / "query", recursive=True)
    gallery, j3 = _read_named_folder(base / "gallery", recursive=True)
    return ReIDSplits(root, "fedreid", train, query, gallery, j1 + j2 + j3)


def _msmt_images(root: Path, split: str) -> Path:
    """The image folder of MSMT17's `split` ("train" or "test"): V1 names it `train/`, V2 `mask_train_v2/`."""
    for name in (split, f"mask_{split}_v2"):
        if (root / name).is_dir():
            return root / name
    raise DatasetLayoutError(f"missing image folder: {root / split} (MSMT17_V2: {root / f'mask_{split}_v2'})")


def _read_msmt_list(root: Path, split: str, list_name: str, optional: bool = False) -> list[ImageRecord]:
    list_path = root / list_name
    if not list_path.is_file():
        if optional:
            return []
        raise DatasetLayoutError(f"missing split list: {list_path}")
    images = _msmt_images(root, split)
    records = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        match = _MSMT_NAME.match(Path(parts[0]).name) if len(parts) == 2 else None
        if match is None or not parts[1].lstrip("-").isdigit():
            raise DatasetLayoutError(f"{list_path}:{lineno}: expected '<dir>/<pid>_<idx>_<cam>_... <pid>'")
        records.append(ImageRecord(images / parts[0], int(parts[1]), int(match.group(1))))
    if not records and not optional:
        raise DatasetLayoutError(f"empty split list: {list_path}")
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} of the {len(records)} images listed in {list_path} are not in {images}, "
            f"e.g. {missing[0]}"
        )
    return records


def _read_msmt17(root: Path, need_train: bool = True) -> ReIDSplits:
    has_train = need_train or (root / "list_train.txt").exists()
    train = _read_msmt_list(root, "train", "list_train.txt") if has_train else []
    train += _read_msmt_list(root, "train", "list_val.txt", optional=True)
    query = _read_msmt_list(root, "test", "list_query.txt")
    gallery = _read_msmt_list(root, "test", "list_gallery.txt")
    return ReIDSplits(root, "msmt17", train, query, gallery)


def _layout_of(root: Path) -> Layout | None:
    if (root / "bounding_box_train").is_dir() or (root / "bounding_box_test").is_dir():
        return "market1501"
    if (root / "detected").is_dir() or (root / "labeled").is_dir():
        return "cuhk03-np"
    if (root / "list_train.txt").is_file() or (root / "list_query.txt").is_file():
        return "msmt17"
    base = root / "pytorch" if (root / "pytorch").is_dir() else root
    if any((base / name).is_dir() for name in ("query", "gallery", "train_all")):
        return "fedreid"
    return None


def detect_layout(root: Path) -> Layout:
    """Name the layout of `root`, or raise DatasetLayoutError saying what was expected (and naming the
    data sets one level down, when `root` is the folder an archive was unpacked into)."""
    if not root.is_dir():
        what = "not a folder" if root.exists() else "data set folder not found"
        raise DatasetLayoutError(f"{what}: {root}")
    layout = _layout_of(root)
    if layout is not None:
        return layout
    inside = sorted(p.name for p in root.iterdir() if p.is_dir() and _layout_of(p) is not None)
    hint = f"; data sets one level down: {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}"
    raise DatasetLayoutError(
        f"unknown data set layout in {root}: expected bounding_box_train/query/bounding_box_test "
        "(Market-1501, Duke, MSMT17 Market-style), detected|labeled/ (CUHK03-NP), list_*.txt (MSMT17), or "
        "pytorch/{train_all,query,gallery} (FedReID)" + (hint if inside else "")
    )


def read_dataset(
    root: str | Path, cuhk03_variant: Literal["detected", "labeled"] | None = None, need_train: bool = True
) -> ReIDSplits:
    """Read a site's train/query/gallery splits from any supported layout (auto-detected). Without
    `need_train` (a labelled validation set) the training split may be missing: then it is empty.
    CUHK03-NP: `cuhk03_variant`, by default `detected/` where it exists, else `labeled/`."""
    root = Path(root)
    layout = detect_layout(root)
    if layout == "market1501":
        return _read_market(root, need_train)
    if layout == "cuhk03-np":
        default = "detected" if (root / "detected").is_dir() else "labeled"
        variant = root / (cuhk03_variant or default)
        if not variant.is_dir():
            raise DatasetLayoutError(f"CUHK03-NP variant folder not found: {variant}")
        splits = _read_market(variant, need_train)
        return ReIDSplits(root, "cuhk03-np", splits.train, splits.query, splits.gallery, splits.junk_dropped)
    if layout == "msmt17":
        return _read_msmt17(root, need_train)
    return _read_fedreid(root, need_train)


def read_image_folder(folder: str | Path) -> list[Path]:
    """All images below an unlabeled folder (e.g. the public KD set), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetLayoutError(f"image folder not found: {folder}")
    paths = _images_in(folder, recursive=True)
    if not paths:
        raise DatasetLayoutError(f"no images in {folder}")
    return paths
