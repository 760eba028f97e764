"""The aggregator's state on disk: ``<state_dir>/<federation>/``.

```
run.json                         the run's configuration identity
metrics.jsonl                    per-site metrics and per-round summaries
rounds/<r>/global.safetensors    global shared state after round r (r = -1: the initial model)
rounds/<r>/updates/<site>.blob   accepted update r of a site, as received (journaled before the ack)
rounds/<r>/updates/<site>.json   its manifest
open.json                        the round being collected (number, selection, base hash)
```

Resume: the last ``global.safetensors`` is the base; the journaled updates of the open round are folded
again, so no acknowledged update is lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class Journal:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def check_identity(self, identity: dict) -> None:
        """Refuse to resume a run that was started with another model or federation settings."""
        path = self.root / "run.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored != identity:
                raise ValueError(f"{path} belongs to another run configuration: use another --state-dir")
        else:
            _atomic_write(path, json.dumps(identity, indent=2).encode())

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / f"{r:05d}"

    def save_global(self, r: int, state: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
        path = self.round_dir(r) / "global.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    def last_global(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(round, state) of the newest checkpoint; round -1 is the initial model."""
        folder = self.root / "rounds"
        rounds = (
            sorted(folder.glob("*/global.safetensors"), key=lambda p: int(p.parent.name))
            if folder.is_dir()
            else []
        )
        if not rounds:
            return None
        path = rounds[-1]
        return int(path.parent.name), load_file(str(path))

    def journal_update(self, r: int, site: str, blob: bytes, manifest: bytes) -> None:
        updates = self.round_dir(r) / "updates"
        _atomic_write(updates / f"{site}.blob", blob)
        _atomic_write(updates / f"{site}.json", manifest)

    def drop_update(self, r: int, site: str) -> None:
        for suffix in (".blob", ".json"):
            (self.round_dir(r) / "updates" / f"{site}{suffix}").unlink(missing_ok=True)

    def journaled_updates(self, r: int) -> list[tuple[str, bytes, bytes]]:
        updates = self.round_dir(r) / "updates"
        if not updates.is_dir():
            return []
        out = []
        for manifest in sorted(updates.glob("*.json")):
            blob = manifest.with_suffix(".blob")
            if blob.is_file():
                out.append((manifest.stem, blob.read_bytes(), manifest.read_bytes()))
        return out

    def save_open_round(self, info: dict) -> None:
        _atomic_write(self.root / "open.json", json.dumps(info).encode())

    def open_round(self) -> dict | None:
        path = self.root / "open.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def append_metrics(self, records: list[dict]) -> None:
        with open(self.root / "metrics.jsonl", "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
