"""The aggregator's state on disk: ``<state_dir>/<federation>/``.

```
run.json                         the run's configuration identity
metrics.jsonl                    per-site metrics and per-round summaries
rounds/<r>/global.safetensors    global model after round r (r = -1: the initial one), a reid.weights file
rounds/<r>/groups.safetensors    client clustering: the group models and the grouping after round r
                                 (written before global.safetensors, which commits the round)
rounds/<r>/records.json          round r's metrics records (summary included), written before the commit:
                                 a restart appends them to metrics.jsonl when the kill came between
rounds/<r>/updates/<site>.blob   accepted update r of a site, as received (journaled before the ack)
rounds/<r>/updates/<site>.json   its manifest
open.json                        the round being collected (number, selection, base hash)
complete.json                    {"rounds": N} once the run finished its N rounds (for `status`)
run_id                           the run's id in every RoundStart: new when the run starts, and again when
                                 the aggregator goes back on acknowledged work (`renew_run_id`)
```

Resume: the last ``global.safetensors`` is the base; the journaled updates of the open round are folded
again, so no acknowledged update is lost. When round r closes its updates are deleted and only the
newest `keep` global checkpoints stay (`prune`): disk use is bounded whatever the number of rounds.
A state dir that cannot be written is a `StateDirError` (the aggregator stops; it never acks an update
it could not journal).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from cloud.metrics_log import records as metrics_records
from reid.data import InputSpec
from reid.files import atomic_write
from reid.model import ModelSpec
from reid.weights import round_checkpoints, save_state

log = logging.getLogger(__name__)


class StateDirError(OSError):
    """The state dir cannot be written (read-only, full, gone): the aggregator must stop."""


class Journal:
    def __init__(self, root: Path, read_only: bool = False) -> None:
        """`read_only`: for watchers (`status`), which never write, move or create anything here."""
        self.root = root
        self.went_back = False  # `last_global` skipped a damaged checkpoint
        if read_only:
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write(root / ".writable", b"ok")  # fail now, not at the first acknowledged update
        except OSError as err:
            raise StateDirError(f"state dir {root} is not writable: {err}") from None

    def newest_round(self) -> int | None:
        """The round of the newest checkpoint on disk (-1: the initial model), without reading it."""
        found = round_checkpoints(self.root)
        return found[-1][0] if found else None

    def check_identity(self, identity: dict, normalise: Callable[[dict], dict] | None = None) -> None:
        """Refuse to resume a run that was started with another model or federation settings. `normalise`
        reads the stored identity as the current version would (settings added since at the default
        that version ran: `ServeConfig.stored_identity`)."""
        path = self.root / "run.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if normalise is not None:
                with contextlib.suppress(ValueError):  # not a configuration this version reads: another run
                    stored = normalise(stored)
            if stored != identity:
                raise ValueError(f"{path} belongs to another run configuration: use another --state-dir")
        else:
            atomic_write(path, json.dumps(identity, indent=2).encode())

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / f"{r:05d}"

    def save_global(
        self, r: int, state: Mapping[str, torch.Tensor], spec: ModelSpec, input_spec: InputSpec, bn: str
    ) -> Path:
        """The global model after round r as a model file (`reid.weights`: any consumer reads it), with
        the run's BatchNorm policy (under ``local`` its BatchNorm layers are no site's)."""
        path = self.round_dir(r) / "global.safetensors"
        try:
            return save_state(path, state, spec, input_spec, {"round": str(r), "bn": bn})
        except OSError as err:
            raise StateDirError(f"cannot write the global checkpoint {path}: {err}") from None

    def save_groups(self, r: int, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Client clustering's state after round r; written before `save_global` of the same round, so
        a committed round always has its groups beside it."""
        path = self.round_dir(r) / "groups.safetensors"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, save(dict(tensors), metadata))
        except OSError as err:
            raise StateDirError(f"cannot write the group models {path}: {err}") from None

    def save_records(self, r: int, records: list[dict]) -> None:
        """Round r's metrics records, kept before the round commits (`pending_records`)."""
        try:
            atomic_write(self.round_dir(r) / "records.json", json.dumps(records).encode())
        except OSError as err:
            raise StateDirError(f"cannot write the records of round {r}: {err}") from None

    def pending_records(self, r: int) -> list[dict]:
        """The records of committed round r that metrics.jsonl lacks (a kill between the commit and the
        append): [] when they are in it, or were never kept."""
        path = self.round_dir(r) / "records.json"
        if self.has_summary("round", r) or not path.is_file():
            return []
        return json.loads(path.read_text())

    def load_groups(self, r: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, metadata) saved by `save_groups` for round r; None if that round had no groups."""
        path = self.round_dir(r) / "groups.safetensors"
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118

    def last_global(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(round, state) of the newest readable checkpoint; round -1 is the initial model. A damaged one
        (a disk that lost writes) is moved aside as ``rounds/<r>.damaged`` with one log line, and the one
        before it is used."""
        for r, path in reversed(round_checkpoints(self.root)):
            try:
                return r, load_file(str(path))
            except Exception as err:  # safetensors' own error type, or an OSError
                log.error("checkpoint %s unreadable (%s): moved aside, using the one before", path, err)
                aside = path.parent.with_name(path.parent.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                path.parent.rename(aside)
                self.went_back = True
        return None

    def mark_complete(self, rounds: int | None) -> None:
        """Record that the run finished its `rounds` (None: it has rounds to run again, after `rounds`
        was raised), for `cloud-aggregator status`."""
        path = self.root / "complete.json"
        if rounds is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, json.dumps({"rounds": rounds}).encode())

    def complete(self) -> int | None:
        """The rounds of the finished run (`mark_complete`), None while it has rounds to run."""
        try:
            return int(json.loads((self.root / "complete.json").read_text())["rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def run_id(self) -> str:
        """The run's id (made when the run starts)."""
        path = self.root / "run_id"
        if path.is_file():
            text = path.read_text().strip()
            if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
                return text
        return self.renew_run_id()

    def renew_run_id(self) -> str:
        """A new run id: the sites drop the progress they made under the old one and train the open
        round again (after the aggregator lost work it had acknowledged)."""
        new = secrets.token_hex(8)
        try:
            atomic_write(self.root / "run_id", new.encode())
        except OSError as err:
            raise StateDirError(f"cannot write the run id in {self.root}: {err}") from None
        return new

    def journal_update(self, r: int, site: str, blob: bytes, manifest: bytes) -> None:
        updates = self.round_dir(r) / "updates"
        try:
            atomic_write(updates / f"{site}.blob", blob)
            atomic_write(updates / f"{site}.json", manifest)
        except OSError as err:
            raise StateDirError(f"cannot journal the update of {site} in {updates}: {err}") from None

    def update_path(self, r: int, site: str) -> Path:
        return self.round_dir(r) / "updates" / f"{site}.blob"

    def prune(self, closed: int, keep: int) -> None:
        """After round `closed` is checkpointed: drop its updates and all but the `keep` newest globals."""
        self.drop_updates(closed)
        folder = self.root / "rounds"
        rounds = sorted((int(p.name) for p in folder.iterdir() if p.name.lstrip("-").isdigit()), reverse=True)
        for damaged in folder.glob("*.damaged"):  # kept until the run has moved past it
            if int(damaged.name.removesuffix(".damaged")) < closed:
                shutil.rmtree(damaged, ignore_errors=True)
        for r in rounds[keep:]:
            if r < closed:
                shutil.rmtree(self.round_dir(r), ignore_errors=True)

    def disk_bytes(self) -> int:
        """Bytes under the run's folder (tests and the chaos check bound it)."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def drop_updates(self, r: int) -> None:
        """Every update journaled in round r."""
        shutil.rmtree(self.round_dir(r) / "updates", ignore_errors=True)

    def drop_update(self, r: int, site: str) -> None:
        for suffix in (".blob", ".json"):
            (self.round_dir(r) / "updates" / f"{site}{suffix}").unlink(missing_ok=True)

    def journaled_updates(self, r: int) -> list[tuple[str, bytes]]:
        """(site, manifest) of each update journaled in round r (its blob: `update_path`)."""
        updates = self.round_dir(r) / "updates"
        if not updates.is_dir():
            return []
        return [
            (manifest.stem, manifest.read_bytes())
            for manifest in sorted(updates.glob("*.json"))
            if manifest.with_suffix(".blob").is_file()
        ]

    def save_open_round(self, info: dict) -> None:
        try:
            atomic_write(self.root / "open.json", json.dumps(info).encode())
        except OSError as err:
            raise StateDirError(f"cannot record the open round in {self.root}: {err}") from None

    def open_round(self) -> dict | None:
        """The journaled open round; None when there is none or it cannot be read (logged: the round
        opens afresh, and updates journaled for it are treated as lost)."""
        path = self.root / "open.json"
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or not {"round", "selected", "base_hash"} <= saved.keys():
                raise ValueError("not a journaled round")
            return saved
        except (OSError, ValueError) as err:
            log.error("journal of the open round %s unreadable (%s): the round opens afresh", path, err)
            return None

    def has_summary(self, kind: str, r: int) -> bool:
        """Whether metrics.jsonl holds the summary record of `kind` ("round", "evaluation") for round r."""
        return any(
            rec is not None and rec.get("kind") == kind and rec.get("round") == r
            for _, rec in metrics_records(self.root / "metrics.jsonl")
        )

    def forget_metrics_after(self, r: int) -> int:
        """Drop the records of rounds after r (the state went back to round r: they will be made again):
        summaries of later rounds and the sites' scores recorded when they closed (a close of round q
        records the scores of model q-1). Returns how many were dropped."""
        path = self.root / "metrics.jsonl"
        kept, dropped = [], 0
        for line, rec in metrics_records(path):
            later = (
                rec is not None
                and "round" in rec
                and (rec["round"] > r or ("kind" not in rec and rec["round"] == r))
            )
            if later:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            atomic_write(path, b"".join(line + b"\n" for line in kept))
        return dropped

    def append_metrics(self, records: list[dict]) -> None:
        path = self.root / "metrics.jsonl"
        torn = False  # a line torn by a kill must not swallow the next record
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(path, "a") as f:
            if torn:
                f.write("\n")
            for rec in records:
                f.write(json.dumps(rec) + "\n")
