"""Gallery features on disk and search: what a camera site does with an exported model.

`extract_folder` writes ``features.npz`` (features float32 N x D, file names relative to the folder, the
folder itself, model version and sha256; loaded without pickle); `search` ranks gallery entries by
cosine similarity (features are L2-normalised, so a dot product). A gallery belongs to the model that
extracted it: `check_model` refuses another one, and `reindex` extracts it again from its folder.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.runtime import FeatureExtractor
from reid.data.layouts import read_image_folder


class GalleryError(ValueError):
    """A gallery file is unreadable or belongs to another model."""


@dataclass
class Gallery:
    features: np.ndarray
    names: list[str]
    version: str
    model_sha256: str
    root: str = ""  # the folder the names are relative to
    flip: bool = False

    def save(self, path: Path) -> None:
        np.savez(
            path,
            features=self.features,
            names=np.array(self.names),
            version=self.version,
            model_sha256=self.model_sha256,
            root=self.root,
            flip=self.flip,
        )

    @classmethod
    def load(cls, path: Path) -> Gallery:
        try:
            with np.load(path, allow_pickle=False) as data:
                gallery = cls(
                    data["features"].astype(np.float32),
                    [str(n) for n in data["names"]],
                    str(data["version"]),
                    str(data["model_sha256"]),
                    str(data["root"]) if "root" in data else "",
                    bool(data["flip"]) if "flip" in data else False,
                )
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:  # (EOF: an empty file)
            raise GalleryError(f"{path}: not a features file ({type(err).__name__}: {err})") from None
        if gallery.features.ndim != 2 or len(gallery.features) != len(gallery.names):
            raise GalleryError(f"{path}: {gallery.features.shape} features for {len(gallery.names)} names")
        return gallery

    def path_of(self, index: int) -> Path:
        return Path(self.root) / self.names[index]

    def check_model(self, fx: FeatureExtractor, source: Path) -> None:
        if self.model_sha256 != fx.contract.sha256:
            same_label = bool(self.version) and self.version == fx.contract.version
            raise GalleryError(
                f"{source} was extracted with model {self.version or '?'} ({self.model_sha256[:12]}), "
                f"not with {fx.contract.version or '?'} ({fx.contract.sha256[:12]}): features of different "
                "models cannot be compared; extract it again or pass --reindex"
                + (
                    ". (One version, two files: every export of a round is its own file, e.g. the agent's "
                    "re-export with its BatchNorm layers and an `export --site-data` by hand; extract and "
                    "search with the same file.)"
                    if same_label
                    else ""
                )
            )
        if self.features.shape[1] != fx.contract.output_dim:
            raise GalleryError(
                f"{source}: {self.features.shape[1]}-d features, the model gives {fx.contract.output_dim}"
            )

    def reindex(self, fx: FeatureExtractor) -> Gallery:
        """The same gallery folder extracted again with `fx`."""
        if not self.root or not Path(self.root).is_dir():
            raise GalleryError(f"cannot re-index: the gallery folder {self.root or '(unknown)'} is gone")
        return extract_folder(fx, Path(self.root), flip=self.flip)


def extract_folder(fx: FeatureExtractor, folder: Path, flip: bool = False) -> Gallery:
    files = read_image_folder(folder)
    feats, kept = fx.extract(files, flip=flip)
    return Gallery(
        feats.astype(np.float32),
        [str(files[i].relative_to(folder)) for i in kept],
        fx.contract.version,
        fx.contract.sha256,
        str(folder.resolve()),
        flip,
    )


def search(gallery: Gallery, queries: np.ndarray, top_k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities), each (num_queries, k), best first; ties keep gallery order."""
    sims = queries @ gallery.features.T
    k = min(top_k, sims.shape[1])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)
