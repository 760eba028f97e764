"""The camera site's feature service on real sockets (uvicorn in a thread, the typed client and raw
HTTP): the same features as the extractor, batches that form under concurrency, gallery and search with
filters, retention, bad input, back-pressure, and a gallery that follows a new model."""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from edge import feature_service
from edge.client import FeatureClient, ServiceError
from edge.feature_api import ServiceConfig
from edge.feature_service import FeatureService, running
from edge.gallery_store import GalleryStore, GalleryStoreError, NewEntry
from export.onnx_export import export_onnx
from export.runtime import FeatureExtractor
from reid.data import ImageDataset, InputSpec, eval_transform
from reid.model import ModelSpec, build_model
from tests.conftest import png_claiming

JSON = {"content-type": "application/json"}


def _metric(url: str, name: str) -> float:
    """A sample of the Prometheus exposition (sum of all label sets)."""
    text = httpx.get(f"{url}/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
              line.startswith(name + "{")]  # fmt: skip
    return sum(values)


@pytest.fixture
def crops(exported) -> list[bytes]:
    return [p.read_bytes() for p in exported[4][:12]]


@pytest.fixture(scope="module")
def new_model(exported, tmp_path_factory):
    """(path, contract) of another model of the same federation, as a new deployment would bring."""
    torch.manual_seed(5)
    other = build_model(ModelSpec(arch="resnet18"), 5).eval()
    spec = InputSpec(height=64, width=32)
    images = torch.stack([ImageDataset(exported[4], eval_transform(spec))[i][0] for i in range(8)])
    path = tmp_path_factory.mktemp("new") / "new.onnx"
    contract, _ = export_onnx(other, spec, path, images, version="round-9")
    return path, contract


def _deploy(state: Path, model: Path, name: str) -> None:
    """What `edge-agent start` does on a deployment: the model in models/<name>/, then the pointer."""
    folder = state / "models" / name
    folder.mkdir(parents=True)
    for source in (model, model.with_name(model.name + ".json")):
        shutil.copy(source, folder / source.name.replace(model.stem, "model"))
    staged = state / "models" / "current.json.tmp"
    staged.write_text(json.dumps({"path": f"{name}/model.onnx"}))
    staged.replace(state / "models" / "current.json")


def test_embed_batches_concurrent_clients_and_matches_the_extractor(exported, crops, tmp_path, monkeypatch):
    model_path = exported[1]
    cfg = ServiceConfig(max_batch=16, max_delay_ms=30)
    service = FeatureService(model_path, tmp_path / "gallery.db", cfg)
    expected = FeatureExtractor(model_path)([Image.open(io.BytesIO(c)) for c in crops])
    try:
        with running(service) as url:
            assert httpx.get(f"{url}/healthz").status_code == 200
            assert httpx.get(f"{url}/readyz").json()["ready"]

            def one(i: int) -> np.ndarray:
                with FeatureClient(url) as client:
                    got = client.embed([crops[i % len(crops)]])
                    assert got.model.sha256 == exported[2].sha256
                    return np.asarray(got.features[0], np.float32)

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(one, range(48)))
            for i, feature in enumerate(results):
                np.testing.assert_allclose(feature, expected[i % len(crops)], atol=1e-4)
            batches = _metric(url, "fedreid_edge_batch_size_count")
            crops_run = _metric(url, "fedreid_edge_batch_size_sum")
            assert crops_run == 48 and batches < 48 / 2  # batches formed: more than 2 crops per model run
            assert _metric(url, "fedreid_edge_requests_total") >= 48
            with FeatureClient(url) as client:  # many crops in one request: decoded on the event loop
                np.testing.assert_allclose(client.embed(crops).features, expected, atol=1e-4)
                monkeypatch.setattr(feature_service, "INLINE_DECODE_PIXELS", 0)  # now in a worker thread
                np.testing.assert_allclose(client.embed(crops).features, expected, atol=1e-4)
            openapi = httpx.get(f"{url}/openapi.json").json()
            assert {"/v1/embed", "/v1/gallery", "/v1/search"} <= set(openapi["paths"])
    finally:
        service.close()


def test_gallery_search_filters_deletion_and_retention(exported, crops, tmp_path):
    service = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    now = time.time()
    try:
        with running(service) as url, FeatureClient(url) as client:
            a = client.add(crops[:6], camera="cam-a", time=now - 10, track="7", labels={"colour": "red"})
            b = client.add(crops[6:10], camera="cam-b", time=now - 5000)
            assert len(a) == 6 and len(b) == 4 and client.gallery().entries == 10
            hit = client.search(crop=crops[7], top_k=3).hits[0]  # itself, from the other camera
            assert hit.id == b[1] and hit.score > 0.999 and hit.camera == "cam-b"
            only_a = client.search(crop=crops[7], top_k=20, cameras=["cam-a"]).hits
            assert {h.id for h in only_a} == set(a) and only_a[0].labels == {"colour": "red"}
            assert [h.score for h in only_a] == sorted((h.score for h in only_a), reverse=True)
            recent = client.search(crop=crops[0], top_k=20, since=now - 60).hits
            assert {h.id for h in recent} == set(a)
            feature = client.embed([crops[2]]).features[0]
            by_feature = client.search(feature=feature, top_k=1, model_sha256=exported[2].sha256)
            assert by_feature.hits[0].id == a[2] and by_feature.model.sha256 == exported[2].sha256
            assert client.delete(a[2]) == 1
            assert a[2] not in {h.id for h in client.search(feature=feature, top_k=10).hits}
            with pytest.raises(ServiceError) as missing:
                client.delete(a[2])
            assert missing.value.status == 404
            assert client.delete_older_than(3600) == 4  # retention by capture time: camera b's
            assert client.gallery().entries == 5
    finally:
        service.close()
    again = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())  # on disk: survives
    try:
        assert len(again.store) == 5 and again.ready() == (True, "ready")
    finally:
        again.close()


def test_bad_input_is_a_clear_4xx_and_the_service_goes_on(exported, crops, tmp_path):
    cfg = ServiceConfig(max_crop_pixels=100 * 100, max_crops_per_request=4, max_crop_bytes=200_000)
    service = FeatureService(exported[1], tmp_path / "gallery.db", cfg)
    big = io.BytesIO()
    Image.new("1", (400, 400)).save(big, "PNG")  # a small file of many pixels
    try:
        with running(service) as url:
            post = lambda path, **kw: httpx.post(f"{url}{path}", **kw)  # noqa: E731
            cases = [
                (post("/v1/embed", content=b"not an image"), 400, "crop 0: not a decodable image"),
                (post("/v1/embed", content=b""), 400, "crop 0: empty"),
                (post("/v1/embed", content=crops[0][:200]), 400, "not a decodable image"),
                (post("/v1/embed", content=big.getvalue()), 413, "400x400 pixels"),
                (post("/v1/embed", content=png_claiming(20000, 10000)), 413, "more than 10000 pixels"),
                (post("/v1/embed", content=b"x" * 300_000), 413, "300000 bytes"),
                (post("/v1/embed", files=[("c", c) for c in crops[:5]]), 413, "5 crops in one request"),
                (post("/v1/embed", files=[("c", b"x" * 300_000)]), 413, "crop 0: 300000 bytes"),
                (post("/v1/search", files=[("c", c) for c in crops[:2]]), 422, "a search takes one crop"),
                (post("/v1/search", content=b" " * (2 << 20), headers=JSON), 413, "search request"),
                (post("/v1/search", json={"feature": [0.1] * 7}), 422, "feature of 7 values"),
                (post("/v1/search", content=b'{"feature": [NaN]}', headers=JSON), 422, "search request"),
                (post("/v1/gallery", params={"labels": "[1]"}, content=crops[0]), 422, "labels"),
                (post("/v1/gallery", params={"camera": "cam\x00"}, content=crops[0]), 422, "camera"),
                (post("/v1/gallery", params={"labels": "[" * 3000}, content=crops[0]), 422, "labels"),
                (post("/v1/gallery", params={"time": "nan"}, content=crops[0]), 422, "time"),  # (was a 500)
                (post("/v1/gallery", params={"time": "inf"}, content=crops[0]), 422, "time"),  # (stayed)
                (post("/v1/search", params={"since": "nan"}, content=crops[0]), 422, "since"),
                (post("/v1/search", json={"feature": [1e308] * 512}), 422, "too large"),
                (post("/v1/search", json={"feature": [0.0] * 512}), 422, "all zeros"),
                (post("/v1/search", json={"feature": [0.1] * 512, "top_k": 0}), 422, "top_k: Input"),
                (httpx.delete(f"{url}/v1/gallery/{2**70}"), 422, "entry_id"),  # (was a 500)
            ]  # fmt: skip
            for response, status, words in cases:
                assert response.status_code == status and words in response.json()["detail"], response.text
            assert httpx.get(f"{url}/healthz").status_code == 200
            good = post("/v1/embed", content=crops[0])
            assert good.status_code == 200 and len(good.json()["features"][0]) == exported[2].output_dim
            assert _metric(url, "fedreid_edge_rejected_total") >= 6
    finally:
        service.close()


def test_a_body_past_the_limit_is_refused_as_it_arrives_not_after():
    """Bodies were read whole before any limit was applied: four 400 MB bodies held 2.1 GB of the service
    (2026-12-04 new-user audit). A body without Content-Length is refused once it passes the limit."""
    import asyncio

    from starlette.requests import Request

    received = [0]

    async def receive() -> dict:
        received[0] += 1
        return {"type": "http.request", "body": b"x" * 300, "more_body": received[0] < 1000}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(feature_service.CropError, match="crop 0: more than 1000 bytes"):
        asyncio.run(feature_service._body(request, 1000, "crop 0"))
    assert received[0] == 4  # (of 1,000 chunks: 300 KB)


def test_a_request_is_decoded_one_crop_at_a_time(exported, crops, monkeypatch):
    """Each crop becomes its model input before the next is decoded: a request of 64 crops of 4096 x 4096
    (all within the limits) held every decoded crop at once and took the service to 9.2 GB."""
    alive, most = [0], [0]
    decode = feature_service.decode_crop

    def counted(data, index, cfg):
        img = decode(data, index, cfg)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(img, lambda: alive.__setitem__(0, alive[0] - 1))
        return img

    monkeypatch.setattr(feature_service, "decode_crop", counted)
    served = feature_service.Served(FeatureExtractor(exported[1]))
    batch = feature_service.crop_inputs(crops[:6], served, ServiceConfig())
    assert batch.shape == (6, 3, 64, 32) and most[0] == 1
    np.testing.assert_array_equal(
        batch, served.extractor.preprocess([decode(c, 0, ServiceConfig()) for c in crops[:6]])
    )


def test_a_full_queue_answers_503_with_retry_after(exported, crops, tmp_path):
    cfg = ServiceConfig(max_batch=2, max_delay_ms=0, max_queue=2)
    service = FeatureService(exported[1], tmp_path / "gallery.db", cfg)
    slow = service.batcher.run

    def slower(batch):
        time.sleep(0.2)
        return slow(batch)

    service.batcher.run = slower  # the model is the bottleneck: requests pile up
    try:
        with running(service) as url:
            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(lambda c: httpx.post(f"{url}/v1/embed", content=c), crops * 2))
            codes = [a.status_code for a in answers]
            assert set(codes) == {200, 503}, codes
            refused = next(a for a in answers if a.status_code == 503)
            assert int(refused.headers["retry-after"]) >= 1 and "queue full" in refused.json()["detail"]
            with FeatureClient(url, retries=20) as client:  # the client waits as told, and gets through
                assert len(client.embed([crops[0]]).features) == 1
    finally:
        service.close()


def _wait_ready(client: FeatureClient, timeout: float = 60) -> None:
    """Until the service answers searches (a gallery being embedded again makes them wait)."""
    deadline = time.monotonic() + timeout
    while not client.ready():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_restart_with_a_new_model_embeds_the_gallery_again(exported, crops, new_model, tmp_path):
    first = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    try:
        with running(first) as url, FeatureClient(url) as client:
            ids = client.add(crops[:8], camera="cam-a")
    finally:
        first.close()
    new_path, new_contract = new_model  # the service was down when the federation deployed it
    second = FeatureService(new_path, tmp_path / "gallery.db", ServiceConfig())
    try:
        with running(second) as url, FeatureClient(url) as client:
            _wait_ready(client)
            info = client.gallery()
            assert info.model.sha256 == new_contract.sha256 and info.entries == 8 and not info.reindexing
            found = client.search(crop=crops[3], top_k=1)
            assert found.model.version == "round-9"
            assert found.hits[0].id == ids[3] and found.hits[0].score > 0.999
        expected = FeatureExtractor(new_path)([Image.open(io.BytesIO(c)) for c in crops[:8]])
        np.testing.assert_allclose(second.store.features, expected, atol=1e-4)  # no feature of the old model
    finally:
        second.close()


def _following(exported, tmp_path: Path, gallery: str) -> tuple[Path, FeatureService]:
    """A service on model "a" of an agent-like state folder, following its deployments every 0.05 s."""
    state = tmp_path / "site"
    _deploy(state, exported[1], "a")
    model = state / "models" / "a" / "model.onnx"
    return state, FeatureService(model, tmp_path / gallery, ServiceConfig(follow_every_s=0.05), follow=state)


def _disk_full_once(monkeypatch, cls, name: str) -> list[int]:
    """`cls.name` raises SQLite's full-disk error on its first call (the 2026-12-04 camera chaos audit's
    tmpfs, filled), then works; the calls are counted."""
    real, calls = getattr(cls, name), []

    def once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, once)
    return calls


def test_background_work_that_fails_on_a_full_disk_is_done_once_there_is_room(
    exported, crops, new_model, tmp_path, monkeypatch, caplog
):
    """A full disk at the first write of each background job ended it for good (camera chaos audit): the
    start-time re-embedding (the service answered 503 forever), retention (expired crops kept, silently)
    and following a deployment (the new model skipped until a restart). Each is tried again now."""
    monkeypatch.setattr(feature_service, "RETRY_S", 0.2)
    monkeypatch.setattr(feature_service, "RETENTION_EVERY_S", 0.2)
    first = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    try:
        with running(first) as url, FeatureClient(url) as client:
            ids = client.add(crops[:4], camera="cam-a", time=1000.0)
    finally:
        first.close()
    staged = _disk_full_once(monkeypatch, GalleryStore, "stage")
    deleted = _disk_full_once(monkeypatch, GalleryStore, "delete_older_than")
    cfg = ServiceConfig(retention_s=3600)
    second = FeatureService(new_model[0], tmp_path / "gallery.db", cfg)  # re-embedding at start
    try:
        with running(second) as url, FeatureClient(url) as client:
            _wait_ready(client)
            assert client.gallery().model.sha256 == new_model[1].sha256 and len(staged) >= 2
            deadline = time.monotonic() + 30
            while client.gallery().entries and time.monotonic() < deadline:  # (captured at 1000: expired)
                time.sleep(0.1)
            assert client.gallery().entries == 0 and len(deleted) >= 2 and ids
    finally:
        second.close()
    said = caplog.text
    assert "trying again every" in said and "retention pass failed" in said
    # following a deployment: the first adoption fails on the full disk, the next one is made
    adopted = _disk_full_once(monkeypatch, GalleryStore, "begin_staging")
    state, third = _following(exported, tmp_path, "g2.db")
    try:
        _deploy(state, new_model[0], "b")
        deadline = time.monotonic() + 60
        while third.served.ref.sha256 != new_model[1].sha256 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert third.served.ref.sha256 == new_model[1].sha256 and len(adopted) >= 2
    finally:
        third.close()


def test_an_addition_kept_while_its_new_model_feature_failed_is_answered_200(
    exported, crops, new_model, tmp_path, monkeypatch
):
    """While a new model is being adopted, an addition is committed, then embedded with the new model too.
    When that second write failed (a full disk) the client got 507 for an entry that was kept, and a
    retry added it twice (camera chaos audit): the answer is 200, and the re-embedding gives it its
    feature."""
    service = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    try:
        service.green = feature_service.Served(FeatureExtractor(new_model[0]))  # (a switch in progress)
        _disk_full_once(monkeypatch, GalleryStore, "stage")
        with running(service) as url, FeatureClient(url) as client:
            ids = client.add(crops[:2], camera="cam-a")
            assert len(ids) == 2 and client.gallery().entries == 2
        assert len(service.store.unembedded(new_model[1].sha256)) == 2  # (left to the re-embedding)
    finally:
        service.green = None
        service.close()


def test_entries_whose_features_were_lost_are_embedded_again_at_start(exported, crops, tmp_path):
    """A gallery file that lost feature rows (a damaged page, a copy cut short): those entries were
    silently left out of every search; the next start embeds them first (searches wait, as for a new
    model)."""
    first = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    try:
        with running(first) as url, FeatureClient(url) as client:
            ids = client.add(crops[:6], camera="cam-a")
        first.store.db.execute("DELETE FROM features WHERE id IN (?, ?)", (ids[1], ids[4]))
    finally:
        first.close()
    second = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    try:
        with running(second) as url, FeatureClient(url) as client:
            _wait_ready(client)
            assert client.gallery().entries == 6
            assert client.search(crop=crops[4], top_k=1).hits[0].id == ids[4]
    finally:
        second.close()


def test_damaged_rows_are_repaired_at_start_not_a_traceback(exported, crops, tmp_path, caplog):
    """One feature of 2 bytes, one capture time 'abc', one camera stored as bytes stopped the service
    at start with a traceback (2026-12-04 new-user audit): the feature is embedded again, the time and
    camera are set to 0 / empty, one line each, and the gallery serves all its entries."""
    first = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    try:
        with running(first) as url, FeatureClient(url) as client:
            ids = client.add(crops[:4], camera="cam-a")
        db = first.store.db
        db.execute("UPDATE features SET feature = x'0102' WHERE id = ?", (ids[1],))
        db.execute("UPDATE entries SET time = 'abc' WHERE id = ?", (ids[2],))
        db.execute("UPDATE entries SET camera = x'ff' WHERE id = ?", (ids[3],))
    finally:
        first.close()
    with caplog.at_level(logging.WARNING):
        second = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    try:
        with running(second) as url, FeatureClient(url) as client:
            _wait_ready(client)
            assert client.gallery().entries == 4
            assert client.search(crop=crops[1], top_k=1).hits[0].id == ids[1]  # (embedded again)
            hits = {h.id: h for h in client.search(crop=crops[2], top_k=4).hits}
            assert hits[ids[2]].time == 0.0 and hits[ids[3]].camera == "" and hits[ids[0]].camera == "cam-a"
    finally:
        second.close()
    said = [r.getMessage() for r in caplog.records if "gallery.db" in r.getMessage()]
    assert any("1 damaged features dropped" in s for s in said) and any(
        "2 entries had a damaged" in s for s in said
    )


def test_a_full_disk_is_a_507_that_names_it_and_keeps_nothing_half_added(exported, crops, tmp_path):
    service = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig())
    try:
        with running(service) as url, FeatureClient(url) as client:
            client.add(crops[:1], camera="cam-a")
            pages = service.store.db.execute("PRAGMA page_count").fetchone()[0]
            service.store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full"
            full = httpx.post(f"{url}/v1/gallery", files=[("c", c) for c in crops[1:9]])
            assert full.status_code == 507 and "database or disk is full" in full.json()["detail"]
            assert client.gallery().entries == 1 and service.store.stored() == 1
            service.store.db.execute("PRAGMA max_page_count = 1073741823")  # room again
            assert len(client.add(crops[1:9], camera="cam-a")) == 8 and client.gallery().entries == 9
    finally:
        service.close()


def test_one_failing_batch_fails_its_requests_only(exported, crops, tmp_path):
    service = FeatureService(exported[1], tmp_path / "gallery.db", ServiceConfig(max_delay_ms=0))
    real = service.batcher.run
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(batch):
        with lock:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("device lost")
        return real(batch)

    service.batcher.run = flaky
    try:
        with running(service) as url:
            first = httpx.post(f"{url}/v1/embed", content=crops[0])
            assert first.status_code == 500 and "RuntimeError" in first.json()["detail"]
            assert httpx.post(f"{url}/v1/embed", content=crops[0]).status_code == 200
    finally:
        service.close()


def test_a_deployed_file_that_fails_its_contract_is_said_once_and_the_service_goes_on(
    exported, new_model, tmp_path, caplog
):
    """A deployed model whose file no longer matches its contract's sha256 was refused again and said
    again every follow_every_s (2026-12-04 new-user audit), and a first refusal raised NameError in the
    follower (its model's hash was never read): one line, and the current model keeps serving."""
    state, service = _following(exported, tmp_path, "gallery.db")
    try:
        _deploy(state, new_model[0], "b")
        damaged = state / "models" / "b" / "model.onnx"
        damaged.write_bytes(damaged.read_bytes() + b"x")  # (its sha256 is no longer the contract's)
        with caplog.at_level(logging.WARNING):
            time.sleep(1.0)  # (about 20 follows)
        said = [r.getMessage() for r in caplog.records if "not adopted" in r.getMessage()]
        assert len(said) == 1 and "sha256" in said[0], said
        assert service.served.ref.sha256 == exported[2].sha256
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        service.close()


def test_a_deployment_while_searching_never_mixes_models_or_fails_a_request(
    exported, crops, new_model, tmp_path
):
    state = tmp_path / "site"
    _deploy(state, exported[1], "a")
    cfg = ServiceConfig(follow_every_s=0.2)
    service = FeatureService(
        state / "models" / "a" / "model.onnx", tmp_path / "gallery.db", cfg, follow=state
    )
    problems: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()
    try:
        with running(service) as url:
            with FeatureClient(url) as client:
                ids = client.add(crops[:8], camera="cam-a")

            def searcher(k: int) -> None:
                with FeatureClient(url, retries=0) as client:
                    n = k
                    while not stop.is_set():
                        i, n = n % 8, n + 1
                        try:
                            found = client.search(crop=crops[i], top_k=1)
                        except ServiceError as err:
                            problems.append(str(err))
                            continue
                        seen.add(found.model.sha256)
                        if found.hits[0].id != ids[i] or found.hits[0].score < 0.999:  # mixed features
                            problems.append(f"crop {i}: {found.hits[0]}")

            def adder() -> None:
                with FeatureClient(url, retries=0) as client:
                    while not stop.is_set():
                        try:
                            client.add(crops[8:10], camera="cam-b")
                        except ServiceError as err:
                            problems.append(str(err))

            workers = [threading.Thread(target=searcher, args=(k,)) for k in range(3)]
            workers.append(threading.Thread(target=adder))
            for w in workers:
                w.start()
            time.sleep(1.0)
            _deploy(state, new_model[0], "b")  # the agent installs the federation's new model
            deadline = time.monotonic() + 60
            while service.served.ref.sha256 != new_model[1].sha256:
                assert time.monotonic() < deadline, "the new model was not adopted"
                time.sleep(0.1)
            time.sleep(1.0)
            stop.set()
            for w in workers:
                w.join(timeout=60)
    finally:
        stop.set()
        service.close()
    assert not problems, problems[:5]
    assert seen == {exported[2].sha256, new_model[1].sha256}  # answered before and after the swap
    store = GalleryStore(tmp_path / "gallery.db", exported[2].output_dim)
    try:  # every entry, also those added during the swap, holds the new model's feature of its crop
        assert store.model_sha256 == new_model[1].sha256 and len(store) > 8
        rows = dict(sqlite3.connect(tmp_path / "gallery.db").execute("SELECT id, crop FROM entries"))
        expected = FeatureExtractor(new_model[0])([Image.open(io.BytesIO(rows[int(i)])) for i in store.ids])
        np.testing.assert_allclose(store.features, expected, atol=1e-4)
    finally:
        store.close()


def test_a_gallery_serves_one_process_at_a_time(exported, crops, tmp_path):
    """Each service keeps the gallery's features in memory: a second process on the same file (a
    serve-features beside the agent's own service) would search an index that misses the first one's
    additions. The second is refused with a clear error while the first holds it, and gets it after."""
    db, contract = tmp_path / "gallery.db", exported[2]
    first = GalleryStore(db, contract.output_dim)
    feats = FeatureExtractor(exported[1])([Image.open(io.BytesIO(crops[0]))])
    first.add([NewEntry(crop=crops[0], camera="c1")], feats, (contract.version, contract.sha256))
    code = f"import pathlib, edge.gallery_store as g; g.GalleryStore(pathlib.Path({str(db)!r}), 512)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "is in use by another process" in other.stderr
    first.close()
    other = subprocess.run(
        [sys.executable, "-c", code + "; print('ok')"], capture_output=True, text=True, timeout=120
    )
    assert other.returncode == 0 and "ok" in other.stdout, other.stderr


def test_a_damaged_gallery_is_named_and_damaged_labels_do_not_fail_searches(
    exported, crops, tmp_path, caplog
):
    db, contract = tmp_path / "gallery.db", exported[2]
    store = GalleryStore(db, contract.output_dim)
    feats = FeatureExtractor(exported[1])([Image.open(io.BytesIO(crops[0]))])
    (entry,) = store.add(
        [NewEntry(crop=crops[0], labels={"a": "b"})], feats, (contract.version, contract.sha256)
    )
    store.db.execute("UPDATE entries SET labels = '{not json' WHERE id = ?", (entry,))
    assert store.entries([entry])[entry].labels == {}  # (was a JSONDecodeError: a 500 on every search)
    assert f"gallery entry {entry}: its labels are damaged" in caplog.text
    store.close()
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(GalleryStoreError, match=r"junk\.db is not a readable gallery .*move it aside"):
        GalleryStore(tmp_path / "junk.db", contract.output_dim)  # (was a traceback naming no file)


def _staged(db: Path, sha: str) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM features WHERE model = ?", (sha,)).fetchone()[0]


def test_a_crash_while_embedding_again_resumes_where_it_stopped(exported, crops, new_model, tmp_path, caplog):
    db, old = tmp_path / "gallery.db", exported[2]
    new_path, new_contract = new_model
    feats = FeatureExtractor(exported[1])([Image.open(io.BytesIO(c)) for c in crops])
    n = 4000
    store = GalleryStore(db, old.output_dim)
    for start in range(0, n, 1000):
        rows = range(start, start + 1000)
        entries = [NewEntry(crop=crops[i % 12], camera=f"cam-{i % 3}") for i in rows]
        store.add(entries, feats[[i % 12 for i in rows]], (old.version, old.sha256))
    store.close()

    # the service, started with the new model, embeds the gallery again and is killed in the middle
    command = [sys.executable, "-m", "edge.cli", "serve-features", "--model", str(new_path)]
    proc = subprocess.Popen([*command, "--gallery", str(db), "--port", "0"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _staged(db, new_contract.sha256) == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the re-embedding did not start"
            time.sleep(0.01)
        # it runs on ONNX Runtime alone: PyTorch would cost seconds of start-up and hundreds of MB
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
        proc.kill()
    finally:
        proc.kill()
        proc.wait(30)
    before = _staged(db, new_contract.sha256)
    assert 0 < before < n, f"killed at {before} of {n}: not in the middle"
    store = GalleryStore(db, old.output_dim)  # the old gallery is whole and still searchable
    assert store.model_sha256 == old.sha256 and len(store) == n
    np.testing.assert_allclose(store.features[:12], feats, atol=1e-6)
    store.close()

    # after the restart it goes on with the entries still missing, then switches
    with caplog.at_level(logging.INFO, logger="edge.feature_service"):
        service = FeatureService(new_path, db, ServiceConfig())
        try:
            deadline = time.monotonic() + 120
            while not service.ready()[0]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            expected = FeatureExtractor(new_path)([Image.open(io.BytesIO(c)) for c in crops])
            assert service.store.model_sha256 == new_contract.sha256 and len(service.store) == n
            np.testing.assert_allclose(service.store.features, expected[np.arange(n) % 12], atol=1e-4)
        finally:
            service.close()
    assert (
        f"embedding {n - before} gallery entries with model round-9 ({before} have their features already)"
        in caplog.text
    )
    with sqlite3.connect(db) as con:  # no feature of the old model is left
        assert (
            con.execute("SELECT COUNT(*) FROM features WHERE model != ?", (new_contract.sha256,)).fetchone()[
                0
            ]
            == 0
        )


def test_the_command_prints_the_port_it_got_and_names_a_missing_model(exported, crops, tmp_path):
    command = [sys.executable, "-m", "edge.cli", "serve-features", "--gallery", str(tmp_path / "g.db")]
    missing = subprocess.run(
        [*command, "--model", str(tmp_path / "none.onnx")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "model not found" in " ".join(missing.stderr.replace("│", " ").split())
    proc = subprocess.Popen(
        [*command, "--model", str(exported[1]), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()  # "serving <version> (<sha>) on http://127.0.0.1:<port>, gallery ..."
        port = int(line.split("http://127.0.0.1:")[1].split(",")[0])
        assert port > 0
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        added = httpx.post(f"http://127.0.0.1:{port}/v1/gallery", files=[("c", c) for c in crops[:3]])
        assert added.status_code == 200, added.text
        # SIGTERM (systemd, docker stop) ended it at exit 143 with the entries still in g.db-wal: a copy of
        # g.db alone was an empty gallery (2026-12-04 new-user audit). It stops as Ctrl-C does.
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert not (tmp_path / "g.db-wal").exists()
    shutil.copy(tmp_path / "g.db", tmp_path / "copy.db")
    with sqlite3.connect(tmp_path / "copy.db") as db:
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 3


def test_the_agents_service_that_could_not_start_is_tried_again(exported, tmp_path, monkeypatch, caplog):
    """The port taken when the first deployment came: the service beside the agent logged one line and
    was never tried again until the agent restarted. It starts once the port is free, with one line
    however many tries failed before."""
    monkeypatch.setattr(feature_service, "RETRY_S", 0.2)
    state = tmp_path / "site"
    _deploy(state, exported[1], "a")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    stop = threading.Event()
    thread = threading.Thread(
        target=feature_service.serve_deployed, args=(state, ServiceConfig(port=port), stop), daemon=True
    )
    with caplog.at_level(logging.INFO, logger="edge.feature_service"):
        thread.start()
        try:
            time.sleep(1.5)  # several tries (one each 0.2 s)
            failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(failed) == 1 and "Address already in use" in failed[0], failed
            taken.close()
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the service did not start once the port was free"
                    time.sleep(0.1)
        finally:
            taken.close()
            stop.set()
            thread.join(timeout=30)
    assert not thread.is_alive()
