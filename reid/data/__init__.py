"""Data sets for person ReID: on-disk layouts (`layouts`) and image loading/transforms (`loading`)."""

from reid.data.layouts import (
    DatasetLayoutError,
    ImageRecord,
    ReIDSplits,
    detect_layout,
    parse_image_name,
    read_dataset,
    read_image_folder,
)
from reid.data.loading import (
    Batch,
    ImageDataset,
    InputSpec,
    eval_transform,
    first_readable,
    make_loader,
    train_transform,
)

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
    "read_dataset",
    "read_image_folder",
    "train_transform",
]
