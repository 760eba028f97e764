"""Gallery features on disk and search: what a camera site does with an exported model.

`extract_folder` writes ``features.npz`` (features float32 N x D, file names, model version and sha256);
`search` ranks gallery entries by cosine similarity (features are L2-normalised, so a dot product).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.runtime import FeatureExtractor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images in {folder}")
    return files


@dataclass
class Gallery:
    features: np.ndarray
    names: list[str]
    version: str
    model_sha256: str

    def save(self, path: Path) -> None:
        np.savez(
            path,
            features=self.features,
            names=np.array(self.names),
            version=self.version,
            model_sha256=self.model_sha256,
        )

    @classmethod
    def load(cls, path: Path) -> Gallery:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                data["features"].astype(np.float32),
                [str(n) for n in data["names"]],
                str(data["version"]),
                str(data["model_sha256"]),
            )


def extract_folder(fx: FeatureExtractor, folder: Path, flip: bool = False) -> Gallery:
    files = image_files(folder)
    feats = fx(files, flip=flip)
    return Gallery(
        feats.astype(np.float32),
        [str(p.relative_to(folder)) for p in files],
        fx.contract.version,
        fx.contract.sha256,
    )


def search(gallery: Gallery, queries: np.ndarray, top_k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities), each (num_queries, k), best first; ties keep gallery order."""
    sims = queries @ gallery.features.T
    k = min(top_k, sims.shape[1])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)
