"""A camera site's gallery on disk: crops, their metadata and their features, in one SQLite file.

SQLite (stdlib, WAL journal, every commit synced) makes every add and delete one atomic transaction, so
a crash (of the process, the OS or the power) loses at most the request in flight and never leaves a
half-written gallery; nothing is pickled (features are raw
float32 bytes, labels JSON). Each entry keeps its crop (as sent, JPEG/PNG) so the gallery can be
embedded again when the model changes. Features are stored per model (`features`, keyed by model
sha256 and entry id): the gallery's *active* model (`model_sha256`) is the one searched; a new model's
features are staged beside it batch by batch (`stage`), so an interrupted re-embedding resumes where it
stopped (`unembedded`), and `activate` switches to the new model in one transaction once every entry
has its feature. Features of two models are never compared. Deleting an entry deletes its crop and
every feature of it (foreign key, ON DELETE CASCADE).

Search is exact cosine similarity (features are L2-normalised) over an in-memory float32 matrix, in
blocks of `BLOCK` rows with a running top-k, so its temporary memory does not grow with the gallery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.messages import untrusted_json
from reid.files import hold_lock

BLOCK = 65536  # gallery rows per block of the similarity product


def _blob(feature: np.ndarray) -> bytes:
    return np.ascontiguousarray(feature, np.float32).tobytes()


log = logging.getLogger(__name__)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    camera TEXT NOT NULL,
    time REAL NOT NULL,
    track TEXT NOT NULL,
    labels TEXT NOT NULL,
    crop BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_time ON entries (time);
CREATE TABLE IF NOT EXISTS features (
    model TEXT NOT NULL,
    id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    feature BLOB NOT NULL,
    PRIMARY KEY (model, id)
);
CREATE INDEX IF NOT EXISTS features_id ON features (id);
"""


_INSERT = "INSERT INTO entries (camera, time, track, labels, crop) VALUES (?, ?, ?, ?, ?)"
_FEATURE = "INSERT OR REPLACE INTO features (model, id, feature) VALUES (?, ?, ?)"


class GalleryStoreError(ValueError):
    """The gallery cannot do what was asked (wrong feature size, another model's features)."""


class OtherModel(GalleryStoreError):
    """The gallery holds features of another model than the caller's (it changed under the request)."""


@dataclass(frozen=True)
class Entry:
    id: int
    camera: str
    time: float
    track: str
    labels: dict[str, str]


@dataclass(frozen=True)
class NewEntry:
    crop: bytes
    camera: str = ""
    time: float = 0.0
    track: str = ""
    labels: dict[str, str] | None = None


def _labels(entry_id: int, text: str) -> dict[str, str]:
    """An entry's stored labels; {} (and one line) when the file was damaged there."""
    try:
        labels = untrusted_json(text)
        if isinstance(labels, dict):
            return {str(k): str(v) for k, v in labels.items()}
    except ValueError:
        pass
    log.warning("gallery entry %d: its labels are damaged, shown as none", entry_id)
    return {}


class GalleryStore:
    def __init__(self, path: Path, dim: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.dim = dim
        self.lock = threading.RLock()
        # one process per gallery: each keeps the features in memory, so a second process would answer
        # from an index that misses the first one's additions and deletions
        owner = hold_lock(path.with_name(path.name + ".lock"))
        if owner is None:
            raise GalleryStoreError(
                f"{path} is in use by another process (a running agent's service, or another "
                "serve-features): give this one its own --gallery, or query that one"
            )
        self._owner = owner  # (closed in close())
        try:
            self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # every commit synced: an answered addition or deletion survives a power cut too (NORMAL
            # survives only the process dying; camera boxes lose power, and a deletion must stay done)
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            if "feature" in {row[1] for row in self.db.execute("PRAGMA table_info(entries)")}:
                raise GalleryStoreError(
                    f"{path}: a gallery file of a development version before 0.x; remove it"
                )
            self.model = self._stored_model()  # (version, sha256) of the features; ("", "") when none yet
            self._repair()
            self._load()
        except sqlite3.DatabaseError as err:  # a damaged file: say which, and what to do
            owner.close()
            raise GalleryStoreError(
                f"{path} is not a readable gallery ({err}): move it aside to start an empty one, or restore "
                "it from a backup"
            ) from None
        except GalleryStoreError:
            owner.close()
            raise

    def _stored_model(self) -> tuple[str, str]:
        rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        return rows.get("model_version", ""), rows.get("model_sha256", "")

    def _repair(self) -> None:
        """Rows a damaged file (or a hand edit) left unusable, one line each: a feature that is not `dim`
        float32 values is dropped, and its entry is embedded again at start like one whose feature was
        lost; a capture time, camera or track of the wrong type becomes 0 / "" (they stopped the service
        at start with a traceback). A file SQLite cannot read at all is GalleryStoreError, above."""
        with self.lock, self._transaction():
            features = self.db.execute(
                "DELETE FROM features WHERE typeof(feature) != 'blob' OR length(feature) != ?",
                (4 * self.dim,),
            ).rowcount
            fixed = sum(
                self.db.execute(
                    f"UPDATE entries SET {column} = ? WHERE typeof({column}) NOT IN ({kinds})", (value,)
                ).rowcount
                for column, kinds, value in (
                    ("time", "'real', 'integer'", 0.0),
                    ("camera", "'text'", ""),
                    ("track", "'text'", ""),
                )
            )
        if features:
            log.warning(
                "%s: %d damaged features dropped; their entries are embedded again", self.path, features
            )
        if fixed:
            log.warning(
                "%s: %d entries had a damaged time, camera or track: set to 0 / empty", self.path, fixed
            )

    # -- in-memory index -------------------------------------------------------------------------------
    def _load(self) -> None:
        rows = self.db.execute(
            "SELECT e.id, e.camera, e.time, f.feature FROM entries e JOIN features f "
            "ON f.id = e.id AND f.model = ? ORDER BY e.id",
            (self.model_sha256,),
        ).fetchall()
        self.ids = np.array([r[0] for r in rows], dtype=np.int64)
        self.cameras = np.array([r[1] for r in rows], dtype=object)
        self.times = np.array([r[2] for r in rows], dtype=np.float64)
        feats = [np.frombuffer(r[3], dtype=np.float32) for r in rows]  # (all `dim` long: _repair)
        self.features = np.stack(feats) if feats else np.zeros((0, self.dim), np.float32)

    @property
    def model_sha256(self) -> str:
        return self.model[1]

    @property
    def model_version(self) -> str:
        return self.model[0]

    def __len__(self) -> int:
        """Entries searchable now (with a feature of the gallery's model)."""
        return len(self.ids)

    def stored(self) -> int:
        """Entries in the file, searchable or not (yet)."""
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    # -- changes (each one transaction) ----------------------------------------------------------------
    def add(self, entries: list[NewEntry], features: np.ndarray, model: tuple[str, str]) -> list[int]:
        """Store entries with their features, made by `model` = (version, sha256); the ids, in order."""
        if features.shape != (len(entries), self.dim):
            raise GalleryStoreError(f"{features.shape} features for {len(entries)} crops of {self.dim}-d")
        version, sha = model
        with self.lock:
            if len(self) and self.model_sha256 != sha:
                raise OtherModel(
                    f"the gallery holds features of model {self.model_version} ({self.model_sha256[:12]}), "
                    f"not of {version} ({sha[:12]})"
                )
            ids = []
            with self._transaction():
                self._set_model(version, sha)
                for e, f in zip(entries, features, strict=True):
                    cur = self.db.execute(
                        _INSERT, (e.camera, e.time, e.track, json.dumps(e.labels or {}), e.crop)
                    )
                    ids.append(int(cur.lastrowid))
                    self.db.execute(_FEATURE, (sha, ids[-1], _blob(f)))
            self.model = (version, sha)
            self.ids = np.concatenate([self.ids, np.array(ids, np.int64)])
            self.cameras = np.concatenate([self.cameras, np.array([e.camera for e in entries], dtype=object)])
            self.times = np.concatenate([self.times, np.array([e.time for e in entries], np.float64)])
            self.features = np.concatenate([self.features, features.astype(np.float32)])
            return ids

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (under `self.lock`); the error that ends it is the one raised (SQLite
        rolls back by itself on a full disk: our own rollback would fail and hide why)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise

    def _set_model(self, version: str, sha: str) -> None:
        """(inside a transaction; `self.model` follows once it is committed)"""
        for key, value in (("model_version", version), ("model_sha256", sha)):
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def delete(self, ids: list[int]) -> int:
        with self.lock:
            self.db.executemany("DELETE FROM entries WHERE id = ?", [(int(i),) for i in ids])
            keep = ~np.isin(self.ids, np.array(ids, np.int64))
            return self._keep(keep)

    def delete_older_than(self, cutoff: float) -> int:
        """Retention: delete every entry captured before `cutoff` (Unix seconds)."""
        with self.lock:
            self.db.execute("DELETE FROM entries WHERE time < ?", (cutoff,))
            return self._keep(self.times >= cutoff)

    def _keep(self, keep: np.ndarray) -> int:
        gone = int((~keep).sum())
        self.ids, self.cameras, self.times = self.ids[keep], self.cameras[keep], self.times[keep]
        self.features = self.features[keep]
        return gone

    # -- reading ---------------------------------------------------------------------------------------
    def entries(self, ids: list[int]) -> dict[int, Entry]:
        with self.lock:
            marks = ",".join("?" * len(ids))
            rows = self.db.execute(
                f"SELECT id, camera, time, track, labels FROM entries WHERE id IN ({marks})", ids
            ).fetchall()
        return {r[0]: Entry(r[0], r[1], r[2], r[3], _labels(r[0], r[4])) for r in rows}

    def search(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        cameras: list[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        model_sha256: str | None = None,
    ) -> list[list[tuple[int, float]]]:
        """Per query, the top-k (id, cosine similarity), best first, among entries that pass the filters
        (camera in `cameras`, `since` <= time <= `until`). With `model_sha256` (the model that made the
        queries), OtherModel unless the gallery's features are that model's."""
        with self.lock:
            if model_sha256 is not None and len(self.ids) and model_sha256 != self.model_sha256:
                raise OtherModel("the queries and the gallery come from different models")
            ids, feats, cams, times = self.ids, self.features, self.cameras, self.times
        mask = np.ones(len(ids), dtype=bool)
        if cameras:
            mask &= np.isin(cams, np.array(cameras, dtype=object))
        if since is not None:
            mask &= times >= since
        if until is not None:
            mask &= times <= until
        best_scores = np.full((len(queries), 0), -np.inf, np.float32)
        best_rows = np.zeros((len(queries), 0), np.int64)
        everything = bool(mask.all())
        for start in range(0, len(ids), BLOCK):
            rows = np.flatnonzero(mask[start : start + BLOCK]) + start
            if not len(rows):
                continue
            block = feats[start : start + BLOCK] if everything else feats[rows]  # (a view when unfiltered)
            sims = queries @ block.T
            scores = np.concatenate([best_scores, sims], axis=1)
            cand = np.concatenate([best_rows, np.broadcast_to(rows, sims.shape)], axis=1)
            k = min(top_k, scores.shape[1])
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            best_scores = np.take_along_axis(scores, part, axis=1)
            best_rows = np.take_along_axis(cand, part, axis=1)
        out = []
        for scores, rows in zip(best_scores, best_rows, strict=True):
            order = np.lexsort((rows, -scores))  # best first, ties by gallery order
            out.append([(int(ids[rows[i]]), float(scores[i])) for i in order])
        return out

    # -- embedding again with a new model ---------------------------------------------------------------
    def begin_staging(self, sha: str) -> int:
        """Prepare to embed the gallery with model `sha`: staged features of any third model (a deployment
        superseded before it was adopted) are dropped; the number of entries already staged for `sha`
        (an interrupted re-embedding) is returned."""
        with self.lock:
            self.db.execute("DELETE FROM features WHERE model NOT IN (?, ?)", (self.model_sha256, sha))
            return int(self.db.execute("SELECT COUNT(*) FROM features WHERE model = ?", (sha,)).fetchone()[0])

    def drop_staged(self) -> None:
        """Drop the staged features of every other model than the gallery's (a deployment superseded
        before it was adopted)."""
        self.begin_staging(self.model_sha256)

    def unembedded(self, sha: str, after_id: int = 0, limit: int = 256) -> list[tuple[int, bytes]]:
        """(id, crop) of entries above `after_id` without a feature of model `sha`, in id order."""
        with self.lock:
            return self.db.execute(
                "SELECT id, crop FROM entries e WHERE id > ? AND NOT EXISTS "
                "(SELECT 1 FROM features f WHERE f.model = ? AND f.id = e.id) ORDER BY id LIMIT ?",
                (after_id, sha, limit),
            ).fetchall()

    def stage(self, ids: list[int], features: np.ndarray, sha: str) -> None:
        """Keep features of model `sha` (not searched until `activate`), one transaction per call."""
        if features.shape != (len(ids), self.dim):
            raise GalleryStoreError(f"{features.shape} features for {len(ids)} entries of {self.dim}-d")
        with self.lock, self._transaction():  # (an entry deleted meanwhile is skipped: its id is gone)
            self.db.executemany(
                "INSERT OR REPLACE INTO features (model, id, feature) "
                "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM entries WHERE id = ?)",
                [(sha, int(i), _blob(f), int(i)) for i, f in zip(ids, features, strict=True)],
            )

    def activate(self, model: tuple[str, str]) -> None:
        """Search with model `model` = (version, sha256) from now on, and drop every other model's
        features, in one transaction. GalleryStoreError if an entry has no feature of it yet."""
        version, sha = model
        with self.lock:
            if self.unembedded(sha, limit=1):
                raise GalleryStoreError(f"not every gallery entry has a feature of model {version}")
            with self._transaction():
                self._set_model(version, sha)
                self.db.execute("DELETE FROM features WHERE model != ?", (sha,))
            self.model = (version, sha)
            self._load()

    def close(self) -> None:
        with self.lock:
            self.db.close()
            self._owner.close()  # (releases the gallery to the next process)
