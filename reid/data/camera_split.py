"""Federated-by-camera clients from sites of any supported layout: the FedReID benchmark's second scenario.

Each camera of each site's training split becomes a client of its own (`<site>-c<camera>`), holding only
that camera's training images; its query and gallery are the whole site's, so evaluation stays on the
site's query/gallery. A client is a Market-1501 folder (`bounding_box_train/ query/ bounding_box_test/`)
of links to the source images (or copies), named ``PPPP_cC_NNNNNN.<ext>`` whatever the source layout,
so every reader and command takes it as a site. `split.json` lists the clients with their site and
camera. Cameras with fewer than `min_images` training images or fewer than `min_ids` identities are
left out (and listed there) rather than becoming clients that cannot train.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from reid.data.layouts import DatasetLayoutError, ImageRecord, read_dataset


@dataclass(frozen=True)
class CameraClient:
    name: str
    site: str
    camera: int
    train_images: int
    identities: int


def write_market_split(records: list[ImageRecord], folder: Path, copy: bool) -> None:
    """One split folder of a Market-1501 site: links to (or copies of) `records`, named by pid and camera."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(records):
        target = folder / f"{r.pid:04d}_c{r.camid}_{i:06d}{r.path.suffix.lower()}"
        if copy:
            shutil.copyfile(r.path, target)
        else:
            os.symlink(r.path.resolve(), target)


def split_by_camera(
    sites: list[Path], out: Path, copy: bool = False, min_images: int = 8, min_ids: int = 2
) -> tuple[list[CameraClient], list[dict]]:
    """Write one client folder per (site, camera) under `out` (which must not hold clients yet); returns
    the clients and the cameras left out with the reason. `split.json` in `out` records both. Every site
    is read before anything is written: a site that cannot be read leaves no half-written `out`."""
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder for the per-camera clients")
    kept, skipped = [], []
    for site, splits in [(site, read_dataset(site)) for site in sites]:
        for camera in sorted({r.camid for r in splits.train}):
            mine = [r for r in splits.train if r.camid == camera]
            ids = len({r.pid for r in mine})
            if len(mine) < min_images or ids < min_ids:
                why = f"{len(mine)} images of {ids} identities (need {min_images} and {min_ids})"
                skipped.append({"site": site.name, "camera": camera, "reason": why})
                continue
            kept.append(
                (CameraClient(f"{site.name}-c{camera}", site.name, camera, len(mine), ids), mine, splits)
            )
    if not kept:  # (a folder of no clients: `simulate` would say "no site folders" next)
        raise DatasetLayoutError(
            f"every camera has fewer than {min_images} training images or {min_ids} identities: no client "
            "to write (lower --min-images)"
        )
    out.mkdir(parents=True, exist_ok=True)
    clients = []
    for client, mine, splits in kept:
        root = out / client.name
        write_market_split(mine, root / "bounding_box_train", copy)
        write_market_split(splits.query, root / "query", copy)
        write_market_split(splits.gallery, root / "bounding_box_test", copy)
        clients.append(client)
    manifest = {"by": "camera", "clients": [asdict(c) for c in clients], "skipped": skipped}
    (out / "split.json").write_text(json.dumps(manifest, indent=2))
    return clients, skipped


def camera_clients(clients: list[Path]) -> dict[str, CameraClient]:
    """Client name -> what `split_by_camera` recorded of it, for client folders it wrote (its `split.json`
    beside them); {} for folders that are sites themselves."""
    parents = {c.parent for c in clients}
    manifest = next(iter(parents)) / "split.json" if len(parents) == 1 else None
    if manifest is None or not manifest.is_file():
        return {}
    listed = {c["name"]: CameraClient(**c) for c in json.loads(manifest.read_text()).get("clients", [])}
    return {c.name: listed[c.name] for c in clients if c.name in listed}


def client_sites(clients: list[Path]) -> dict[str, str]:
    """Client name -> its site (as `camera_clients`)."""
    return {name: c.site for name, c in camera_clients(clients).items()}
