"""Decoding one image file (PIL only, no PyTorch: the ONNX runtime and the feature service use it too)."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)


def open_rgb(path: Path) -> Image.Image | None:
    """Decode an image as RGB, upright by its EXIF orientation (phone-made crops), or None (with one
    warning line) when it is corrupt or unreadable."""
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        log.warning("skipping corrupt image %s: %s", path, err)
        return None
