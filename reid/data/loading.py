"""Image datasets, the paper's transforms and DataLoaders that skip corrupt images instead of crashing.

A corrupt or unreadable image is logged once (with its path) and left out of its batch; every batch
carries how many images were skipped so that training and evaluation can report the count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from reid.data.images import open_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputSpec(BaseModel):
    """How images are fed to the network (also the export preprocessing contract)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int = Field(256, ge=16, description="input height in pixels")
    width: int = Field(128, ge=16, description="input width in pixels")
    mean: tuple[float, float, float] = Field(
        IMAGENET_MEAN, description="per-channel normalisation mean (RGB, 0..1 scale)"
    )
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="per-channel normalisation std")
    pad: int | None = Field(
        None, ge=0, description="training pad/crop jitter in pixels (None: 10 at 256 high)"
    )

    @property
    def pad_pixels(self) -> int:
        """The paper pads 10 px at 256x128; smaller inputs get proportionally less jitter."""
        return self.pad if self.pad is not None else max(1, round(10 * self.height / 256))


def train_transform(spec: InputSpec) -> T.Compose:
    """The paper's training augmentation: bicubic resize, pad 10 (scaled), random crop, flip, normalise."""
    size = (spec.height, spec.width)
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.Pad(spec.pad_pixels),
            T.RandomCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )


def eval_transform(spec: InputSpec) -> T.Compose:
    size = (spec.height, spec.width)
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )


class ImageDataset(Dataset):
    """Paths (+ optional integer labels) -> (image tensor, label, index); None for a corrupt image."""

    def __init__(
        self, paths: Sequence[Path], transform: T.Compose, labels: Sequence[int] | None = None
    ) -> None:
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        img = open_rgb(self.paths[index])
        if img is None:
            return None
        return self.transform(img), self.labels[index], index


def public_images(folder: str | Path, spec: InputSpec) -> ImageDataset:
    """The public unlabeled set for KD (a folder of crops, eval transform), checked to hold a readable
    image at start: a folder of unreadable files failed the run only at the first KD, after a round of
    training ("no teacher embeddings"). DatasetLayoutError naming the folder."""
    from reid.data.layouts import DatasetLayoutError, read_image_folder

    dataset = ImageDataset(read_image_folder(folder), eval_transform(spec))
    try:
        first_readable(dataset, 1)
    except ValueError:
        raise DatasetLayoutError(f"{folder}: none of its {len(dataset)} images can be read") from None
    return dataset


def first_readable(dataset: ImageDataset, n: int) -> torch.Tensor:
    """The first `n` readable images of a dataset, stacked (corrupt ones skipped); ValueError if none."""
    images = []
    for i in range(len(dataset)):
        item = dataset[i]
        if item is not None:
            images.append(item[0])
        if len(images) == n:
            break
    if not images:
        raise ValueError("no readable image")
    return torch.stack(images)


class InMemoryDataset(Dataset):
    """Every item of a dataset with a deterministic transform, read once and kept: evaluation crops that are
    scored again every round are decoded and resized once (corrupt ones stay None, logged once)."""

    def __init__(self, dataset: Dataset) -> None:
        self.items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        return self.items[index]


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def collate_skipping(items: list[tuple[torch.Tensor, int, int] | None]) -> Batch:
    good = [item for item in items if item is not None]
    skipped = len(items) - len(good)
    if not good:
        return Batch(
            torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
        )
    images, labels, indices = zip(*good, strict=True)
    return Batch(torch.stack(images), torch.tensor(labels), torch.tensor(indices), skipped)


def train_steps(n_images: int, batch_size: int) -> int:
    """Optimizer steps in one training epoch of `make_loader` over `n_images` (drop-last batches; a set no
    larger than one batch is one step)."""
    return n_images // batch_size if n_images > batch_size else 1


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int | None = None,
) -> DataLoader:
    """Shuffled, drop-last loader for training; ordered, complete loader for evaluation.

    A training set no larger than one batch is one (smaller) batch instead of none, so a tiny site or
    public set still trains. `dataset` yields what `ImageDataset` yields (also a ConcatDataset of them).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        generator=generator,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


STATISTICS_IMAGES = 512  # what a site's BatchNorm statistics are estimated on: seconds on a CPU
STATISTICS_BATCH = 16  # the smallest synthetic site has 20 training images


class SeededAugmentation(ImageDataset):
    """`train_transform`'s augmentation (pad, crop, flip) with its draws from a generator seeded by each
    image's index instead of the global random state: the same views in any thread or process, and no
    draw taken from a training running beside it."""

    def __init__(self, paths: Sequence[Path], spec: InputSpec) -> None:
        size = (spec.height, spec.width)
        resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)
        super().__init__(paths, T.Compose([resize, T.Pad(spec.pad_pixels), T.ToTensor()]))
        self.spec = spec
        self.normalize = T.Normalize(spec.mean, spec.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        item = super().__getitem__(index)
        if item is None:
            return None
        padded, label, i = item
        draws = torch.Generator().manual_seed(index)
        top, left = torch.randint(0, 2 * self.spec.pad_pixels + 1, (2,), generator=draws).tolist()
        crop = padded[:, top : top + self.spec.height, left : left + self.spec.width]
        if torch.rand(1, generator=draws).item() < 0.5:
            crop = crop.flip(-1)
        return self.normalize(crop), label, i


def statistics_loader(paths: Sequence[Path], spec: InputSpec) -> DataLoader:
    """The first `STATISTICS_IMAGES` of `paths` (a site's training images, in their layout's order) with
    the training augmentation (seeded: `SeededAugmentation`), in equal seeded batches: what a site's
    BatchNorm statistics are estimated on (`reid.train.estimate_batchnorm`). The same batches wherever
    that runs (simulator, agent, deployment, CLI), so each computes the same statistics; augmented as
    in training, so that they are those training would keep under the weights in use (un-augmented
    crops of one camera give narrower ones: 3 points lower by camera on the validation split)."""
    return statistics_batches(statistics_images(paths, spec))


def statistics_images(paths: Sequence[Path], spec: InputSpec) -> SeededAugmentation:
    """The images of `statistics_loader` (the same views every time they are read: they may be kept)."""
    return SeededAugmentation(list(paths)[:STATISTICS_IMAGES], spec)


def statistics_batches(images: Dataset) -> DataLoader:
    """`statistics_images` (or those kept in memory) in `statistics_loader`'s batches."""
    return make_loader(images, STATISTICS_BATCH, train=True, seed=0)
