"""Data sets for person ReID: on-disk layouts (`layouts`), decoding one image (`images`) and PyTorch image
loading/transforms (`loading`).

The names of `loading` are imported on first use (PEP 562), so that `reid.data.images` and the layouts
do not load PyTorch: the feature service and the ONNX runtime need only those.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reid.data.layouts import (
    DatasetLayoutError,
    ImageRecord,
    ReIDSplits,
    detect_layout,
    parse_image_name,
    read_dataset,
    read_image_folder,
)

if TYPE_CHECKING:
    from reid.data.loading import (
        Batch,
        ImageDataset,
        InputSpec,
        eval_transform,
        first_readable,
        make_loader,
        public_images,
        statistics_loader,
        train_transform,
    )

LAZY = (
    "Batch",
    "ImageDataset",
    "InputSpec",
    "eval_transform",
    "first_readable",
    "make_loader",
    "public_images",
    "statistics_loader",
    "train_transform",
)


def __getattr__(name: str) -> Any:
    if name in LAZY:
        return getattr(importlib.import_module("reid.data.loading"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Batch",
    "DatasetLayoutError",
    "ImageDataset",
    "ImageRecord",
    "InputSpec",
    "ReIDSplits",
    "detect_layout",
    "eval_transform",
    "first_readable",
    "make_loader",
    "parse_image_name",
    "public_images",
    "read_dataset",
    "read_image_folder",
    "statistics_loader",
    "train_transform",
]
