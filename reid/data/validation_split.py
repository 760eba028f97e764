"""A held-out validation split of each site's *training* identities, for choosing settings without
looking at the test queries.

`hold_out` writes a Market-1501 folder per site (links, as `camera_split` writes them): a seeded
fraction of the site's training identities (at least `min_ids`) is taken out of training and becomes
the site's query/gallery, all against all: the gallery holds every held-out image, and every image of a
held-out identity seen by two or more cameras is also a query (the evaluation drops a query's own camera
from its gallery, itself included, so each query is matched in the other cameras); identities seen by
one camera only are gallery distractors. With `distractors`, the images of the identities that stay in
training join the gallery too (they are not queries): a small site's gallery of two held-out people
becomes one of all its people, as hard to search as its size allows. Every held-out image that can be
scored is scored: a small site gives several times the queries of one query per camera and identity,
so the split separates settings that a handful of queries would tie. The site's real query/gallery are
not used. A study run on these folders ranks methods and settings; the test run then uses the real
splits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from reid.data.camera_split import write_market_split
from reid.data.layouts import ImageRecord, read_dataset


def hold_out(
    sites: list[Path],
    out: Path,
    fraction: float = 0.25,
    min_ids: int = 2,
    seed: int = 0,
    distractors: bool = False,
) -> list[Path]:
    """Validation sites under `out` (which must not hold sites yet), one per site and in the same order;
    `validation.json` in `out` lists the held-out identities and the query/gallery sizes."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder for the validation sites")
    written, manifest = [], []
    for site in sites:
        train = read_dataset(site).train
        pids = sorted({r.pid for r in train})
        take = max(min_ids, round(fraction * len(pids)))
        if take >= len(pids):
            raise ValueError(
                f"{site.name}: {len(pids)} training identities cannot spare {take} for validation"
            )
        held = set(random.Random(f"{seed}:{site.name}").sample(pids, take))
        query: list[ImageRecord] = []
        gallery: list[ImageRecord] = []
        for pid in sorted(held):
            mine = [r for r in train if r.pid == pid]
            if len({r.camid for r in mine}) > 1:
                query += mine
            gallery += mine
        if not query:
            raise ValueError(f"{site.name}: no held-out identity is seen by two cameras; hold out more")
        kept = [r for r in train if r.pid not in held]
        if distractors:
            gallery += kept
        root = out / site.name
        write_market_split(kept, root / "bounding_box_train", False)
        write_market_split(query, root / "query", False)
        write_market_split(gallery, root / "bounding_box_test", False)
        written.append(root)
        manifest.append(
            {"site": site.name, "held_out": sorted(held), "query": len(query), "gallery": len(gallery)}
        )
    settings = {"fraction": fraction, "seed": seed, "distractors": distractors}
    (out / "validation.json").write_text(json.dumps({**settings, "sites": manifest}))
    return written
