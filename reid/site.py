"""One site's data, ready for training and evaluation: the piece that the edge agent, the simulator and
the benchmarks share (read the layout, build loaders, pick the fixed CDW batch, evaluate a model)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from reid.data import (
    DatasetLayoutError,
    ImageDataset,
    InputSpec,
    ReIDSplits,
    eval_transform,
    first_readable,
    make_loader,
    read_dataset,
    train_transform,
)
from reid.data.loading import InMemoryDataset, statistics_batches, statistics_images
from reid.evaluate import Embedded, Metrics, extract_features
from reid.model import ReIDModel

log = logging.getLogger(__name__)

# images read again and again the same (the query and gallery crops, the BatchNorm statistics' views),
# decoded and resized, are kept in memory up to this size per site, a set at a time as first read (the
# synthetic study's sites: ~10 MB; Market-1501 at 256x128 keeps its 512 statistics views, 200 MB, and reads
# its query and gallery, 1.3 and 6 GB, from disk every time): bounded for a camera site's small machine
KEEP_BYTES = 512 * 2**20


class SiteData:
    """Train/query/gallery of one site, with its loaders."""

    def __init__(
        self,
        root: str | Path,
        input_spec: InputSpec | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int | None = 0,
        need_train: bool = True,
    ) -> None:
        self.input_spec = input_spec or InputSpec()
        self.splits: ReIDSplits = read_dataset(root, need_train=need_train)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.labels = self.splits.train_labels()
        self._kept: dict[str, Dataset] = {}
        self._kept_bytes = 0

    @property
    def name(self) -> str:
        return self.splits.root.name

    @property
    def num_classes(self) -> int:
        return self.splits.num_train_ids

    @property
    def num_train_images(self) -> int:
        return len(self.splits.train)

    def train_loader(self) -> DataLoader:
        n = len(self.splits.train)
        if n < 2:  # BatchNorm cannot train on a batch of one
            raise ValueError(f"{self.splits.root}: {n} training image(s); training needs at least 2")
        if n < self.batch_size:
            log.warning(
                "%s: %d training images, fewer than one batch of %d: each epoch is one batch of %d",
                self.splits.root,
                n,
                self.batch_size,
                n,
            )
        dataset = ImageDataset(
            [r.path for r in self.splits.train], train_transform(self.input_spec), self.labels
        )
        return make_loader(dataset, self.batch_size, train=True, num_workers=self.num_workers, seed=self.seed)

    def cdw_images(self, n: int = 32) -> torch.Tensor:
        """A fixed, un-augmented batch of training images (the same every round) for the CDW distance."""
        rng = np.random.default_rng(0 if self.seed is None else self.seed)
        order = rng.permutation(len(self.splits.train))
        dataset = ImageDataset([self.splits.train[i].path for i in order], eval_transform(self.input_spec))
        try:
            return first_readable(dataset, n)
        except ValueError:  # (it said "no readable image" without saying where)
            raise DatasetLayoutError(
                f"{self.splits.root}: none of the {len(dataset)} training images can be read"
            ) from None

    def statistics_loader(self) -> DataLoader:
        """What this site's BatchNorm statistics are estimated on (`reid.data.statistics_loader`)."""
        paths = [r.path for r in self.splits.train]
        return statistics_batches(
            self._kept_set("statistics", lambda: statistics_images(paths, self.input_spec))
        )

    def _features(
        self, model: ReIDModel, split: str, device: torch.device, flip: bool, cameras: Collection[int] | None
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        records = getattr(self.splits, split)
        keep = [i for i, r in enumerate(records) if cameras is None or r.camid in cameras]
        if not keep:  # none of these cameras' crops in this split
            return torch.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        dataset = self._kept_set(
            split, lambda: ImageDataset([r.path for r in records], eval_transform(self.input_spec))
        )
        workers = 0 if isinstance(dataset, InMemoryDataset) else self.num_workers  # nothing left to read
        if len(keep) < len(records):
            dataset = Subset(dataset, keep)  # (its items keep their index in the whole split)
        loader = make_loader(dataset, self.batch_size * 2, train=False, num_workers=workers)
        try:
            feats, idx = extract_features(model, loader, device, flip=flip)
        except ValueError:  # (each unreadable image had its own line)
            raise DatasetLayoutError(
                f"{self.splits.root}: none of the {len(keep)} {split} images can be read"
            ) from None
        pids = np.array([records[i].pid for i in idx])
        cams = np.array([records[i].camid for i in idx])
        return feats, pids, cams

    def _kept_set(self, name: str, images: Callable[[], ImageDataset]) -> Dataset:
        """The set `name` of `images()` (whose transform draws nothing at random): made on first use, read
        once and kept when it fits what is left of `KEEP_BYTES`, else read from disk each time. The splits
        are fixed when this object is made: kept files are not read again."""
        if name not in self._kept:
            dataset = images()
            size = len(dataset) * 3 * self.input_spec.height * self.input_spec.width * 4
            if self._kept_bytes + size <= KEEP_BYTES:
                self._kept_bytes += size
                self._kept[name] = InMemoryDataset(dataset)
            else:
                self._kept[name] = dataset
        return self._kept[name]

    def embed(
        self,
        model: ReIDModel,
        device: torch.device | str = "cpu",
        flip: bool = True,
        cameras: Collection[int] | None = None,
    ) -> Embedded:
        """This site's query and gallery crops embedded by `model`: all of them, or those of `cameras`."""
        device = torch.device(device)
        q = self._features(model, "query", device, flip, cameras)
        g = self._features(model, "gallery", device, flip, cameras)
        return Embedded(*q, *g)

    def evaluate(
        self, model: ReIDModel, device: torch.device | str = "cpu", flip: bool = True, max_rank: int = 50
    ) -> Metrics:
        """Market-1501 protocol on this site's query/gallery with `model`'s embeddings."""
        metrics = self.embed(model, device, flip).score(max_rank)
        if metrics.num_valid == 0:
            log.warning(
                "no valid queries in %s: no query has a true match on another camera; nothing to score",
                self.splits.root,
            )
        return metrics
