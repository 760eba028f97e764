"""Decoding one image file (PIL only, no PyTorch: the ONNX runtime and the feature service use it too)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

#: Modes of 16- and 32-bit greyscale images (16-bit PNGs): `convert("RGB")` clips them to white.
_WIDE_GREY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_warned: set[Path] = set()  # one warning per unreadable file and process (they are read every epoch)
NAMED_MAX = 20  # unreadable files named per process; the rest are counted (a vanished folder: thousands)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image, upright by its EXIF orientation (phone-made crops), in 8-bit RGB. A 16-bit
    greyscale image keeps its tones (its top 8 bits), where PIL's own conversion makes it white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_GREY:
        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def open_rgb(path: Path) -> Image.Image | None:
    """Decode an image as 8-bit RGB (`to_rgb`), or None when it is missing, corrupt or unreadable (also
    a header claiming more pixels than PIL's bomb limit): one warning line per file for the first
    `NAMED_MAX` files of the process, then one line saying the rest are only counted."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        if path not in _warned and len(_warned) <= NAMED_MAX:
            _warned.add(path)
            if len(_warned) <= NAMED_MAX:
                log.warning("skipping unreadable image %s: %s", path, err)
            else:
                log.warning("more unreadable images: skipped and counted, no longer named one by one")
        return None
