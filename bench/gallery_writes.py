"""Benchmark: gallery additions and deletions per second, each its own transaction, with every commit
synced (``synchronous=FULL``, what `edge.gallery_store.GalleryStore` does) vs. SQLite's WAL default
(``NORMAL``, which a power cut can undo), side by side in one run on the same disk.

    .venv/bin/python bench/gallery_writes.py [--n 400] [--repeats 3] [--dir FOLDER]

Run it with ``--dir`` on the disk the gallery lives on (an SD card is much slower to sync than an SSD).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.gallery_store import GalleryStore, NewEntry


def writes_per_second(folder: Path, mode: str, n: int) -> tuple[float, float]:
    """(additions/s, deletions/s), one entry per transaction, with `PRAGMA synchronous=<mode>`."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        store = GalleryStore(Path(tmp) / "g.db", 512)
        store.db.execute(f"PRAGMA synchronous={mode}")
        crop = b"\xff\xd8" + bytes(8000)  # an 8 KB crop, kept as sent
        feature = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
        start = time.perf_counter()
        ids = [store.add([NewEntry(crop, "cam", 1.0, "", {})], feature, ("v", "a" * 64))[0] for _ in range(n)]
        added = time.perf_counter() - start
        start = time.perf_counter()
        for entry in ids:
            store.delete([entry])
        deleted = time.perf_counter() - start
        store.close()
    return n / added, n / deleted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="additions (then deletions) per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="a folder on the gallery's disk"
    )
    args = p.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"FULL": [], "NORMAL": []}
    for _ in range(args.repeats):  # interleaved, so that both see the same disk state
        for mode in runs:
            runs[mode].append(writes_per_second(args.dir, mode, args.n))
    for mode, rows in runs.items():
        adds = statistics.median(r[0] for r in rows)
        dels = statistics.median(r[1] for r in rows)
        print(f"{mode:6s}: {adds:7.0f} additions/s ({1000 / adds:.2f} ms), {dels:7.0f} deletions/s")
    full, normal = (statistics.median(r[0] for r in runs[m]) for m in ("FULL", "NORMAL"))
    print(f"synced commits cost x{normal / full:.1f} per addition (medians of {args.repeats} runs)")


if __name__ == "__main__":
    main()
