"""The federation survives its sites (real mosquitto): an insider's manifests, weights and floods, a
restart at any moment, failures that must be visible, and a state dir that cannot be written."""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as paho
import pytest
import torch
import zstandard
from paho.mqtt.enums import CallbackAPIVersion
from safetensors import safe_open
from safetensors.torch import load_file, save

from cloud.config import ServeConfig
from cloud.deploy import load_round
from cloud.journal import StateDirError
from cloud.server import Aggregator
from cloud.strategy import AdmissionConfig, KDConfig, StrategyConfig
from cloud.strategy.clustering import ClusterConfig
from protocol.broker import parse_url
from protocol.chunks import InboundBlob, blob_ref, check_ref, parse_chunk, split_blob
from protocol.codec import encode_state
from protocol.messages import MAX_SAMPLES, MAX_SELECTED, RunEnd, UpdateManifest, encode_message, parse_message
from protocol.mqtt import Endpoint
from protocol.topics import Topics
from reid.train import TrainConfig
from reid.weights import find_model
from tests.cloud.test_federation import TINY, RawSite, _wait


def _start(cfg: ServeConfig, url: str, sites: list[str]) -> tuple[Aggregator, RawSite, threading.Thread]:
    agg = Aggregator(cfg, url)
    raw = RawSite(url, Topics(cfg.federation))
    for s in sites:
        raw.status(s)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            agg.run()
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    assert _wait(lambda: raw.round is not None and agg.current is not None)
    return agg, raw, thread


def _deltas(agg: Aggregator, seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (rng.standard_normal(v.shape) * scale).astype(np.float32)
        if v.dtype.is_floating_point
        else np.zeros(v.shape, np.int64)
        for k, v in agg.global_state.items()
    }


def _summaries(cfg: ServeConfig) -> list[dict]:
    lines = (cfg.state_dir / cfg.federation / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "round"]


def _change(cfg: ServeConfig, r: int) -> float:
    """L2 norm of the global model's change in round r (float keys)."""
    root = cfg.state_dir / cfg.federation / "rounds"
    before = load_file(str(root / f"{r - 1:05d}" / "global.safetensors"))
    after = load_file(str(root / f"{r:05d}" / "global.safetensors"))
    return float(
        np.sqrt(
            sum(
                np.sum((after[k].double().numpy() - before[k].double().numpy()) ** 2)
                for k in after
                if after[k].dtype.is_floating_point
            )
        )
    )


@pytest.mark.parametrize(
    ("weighting", "fednova", "claims"),
    [
        ("fedpav", False, ({"n_samples": MAX_SAMPLES}, {"n_samples": 1})),
        ("fedpav", True, ({"n_samples": MAX_SAMPLES}, {"n_samples": 1})),
        ("cdw", False, ({"cdw": 2.0}, {"cdw": 2.0})),
    ],
)
def test_no_site_controls_the_model(tmp_path, mosquitto_url, weighting, fednova, claims):
    """Weight hijack (the most images a manifest may claim under FedPav, the largest CDW distance under
    CDW against honest 0.5), a 1e13 constant and a 1e30 constant, from 2 colluding sites of 5: every
    update is acknowledged and aggregated, and the global model moves about as far as in an honest round
    (the defaults: share cap 2/K, clip at 3x the median norm). Under fednova the huge claim would also
    make every site's step as long as its path: an unvouched claim counts there as the median one."""
    cfg = ServeConfig(
        federation="caps",
        state_dir=tmp_path,
        rounds=2,
        min_sites=5,
        deadline_s=60,
        final_eval=False,
        strategy=StrategyConfig(weighting=weighting, fednova=fednova),
        **TINY,
    )
    sites = ["a", "b", "c", "x", "y"]
    honest_path = TrainConfig(batch_size=TINY["batch_size"]).path_length(100) if fednova else 1.0
    agg, raw, thread = _start(cfg, mosquitto_url, sites)
    honest_means = []
    try:
        for r, (claim, constant_value) in enumerate(zip(claims, (1e13, 1e30), strict=True)):
            assert _wait(lambda r=r: raw.round is not None and raw.round.round == r, timeout=120)
            honest = {s: _deltas(agg, 10 * r + i) for i, s in enumerate("abc")}
            honest_means.append(
                float(
                    np.sqrt(
                        sum(np.sum(np.mean([d[k] for d in honest.values()], 0) ** 2) for k in honest["a"])
                    )
                )
            )
            for s, d in honest.items():
                raw.update(s, d, n_samples=100)
            hijack = _deltas(agg, 99 + r)
            raw.update("x", hijack, **claim)
            constant = {
                k: np.full_like(v, constant_value) if v.dtype.kind == "f" else v for k, v in hijack.items()
            }
            blob = encode_state(constant, "fp32")  # fp16 cannot hold 1e13 or 1e30: it stays fp32
            raw.blob_update("y", blob)
            assert _wait(lambda r=r: agg.completed == r, timeout=120)
        thread.join(timeout=60)
        assert not thread.is_alive() and not thread.errors
    finally:
        raw.stop()
    acked = [(a["site"], a["round"]) for a in raw.acks if a["accepted"]]
    assert sorted(acked) == sorted((s, r) for s in sites for r in (0, 1))  # acknowledged = aggregated
    for r, summary in enumerate(_summaries(cfg)):
        assert summary["accepted"] == sorted(sites) and summary["rejected"] == []
        assert sorted(summary["weights"]) == sorted(sites)
        assert max(summary["weights"].values()) <= 2 / 5 + 1e-9  # nobody above 2 x the fair share
        assert "y" in summary["clipped"]
        change = _change(cfg, r)
        median_norm = summary["norm_bound"] / 3 * honest_path  # (fednova: the bound is per unit of path)
        assert summary.get("path_length", 1.0) <= honest_path + 1e-6
        assert np.isfinite(change) and change <= median_norm  # no more than one honest site's step
        assert change < 2 * honest_means[r]  # the order of the honest sites' mean step
    assert "x" in _summaries(cfg)[0]["share_capped"]
    assert _summaries(cfg)[0]["path_capped"] == (["x"] if fednova else [])


@pytest.mark.parametrize("vouched,fednova", [(False, False), (True, False), (False, True), (True, True)])
def test_a_vouched_large_site_moves_the_model_as_far_as_its_data(
    tmp_path, mosquitto_url, vouched, fednova, caplog
):
    """An honest federation of 800 / 176 / 40 images whose largest site takes an 8 x longer step (as
    measured on the demo's data under bn=local): with sizes only claimed the defaults clip it and cap its
    share, and say so in one line; with the sizes vouched for (site_samples) the round is plain FedPav.
    Under fednova the norm bound sees each delta over its path length: vouched, the large site's
    normalised step is the others' and the round is plain FedNova; claimed only, its path counts as the
    median site's (an insider's claim must not lengthen every site's step), so it is clipped as under
    FedPav."""
    caplog.set_level(logging.WARNING, logger="cloud.server")
    samples = {"big": 800, "mid": 176, "small": 40}
    admission = AdmissionConfig(site_samples=samples if vouched else {})
    cfg = ServeConfig(
        federation="vouched",
        state_dir=tmp_path,
        rounds=1,
        min_sites=3,
        deadline_s=60,
        final_eval=False,
        admission=admission,
        strategy=StrategyConfig(fednova=fednova),
        **TINY,
    )
    agg, raw, thread = _start(cfg, mosquitto_url, list(samples))
    scales = {"big": 0.08, "mid": 0.01, "small": 0.001}
    deltas = {s: _deltas(agg, i, scales[s]) for i, s in enumerate(samples)}
    try:
        for s, d in deltas.items():
            raw.update(s, d, n_samples=samples[s])
        assert _wait(lambda: agg.completed == 0, timeout=120)
        thread.join(timeout=60)
        assert not thread.is_alive() and not thread.errors
    finally:
        raw.stop()
    (summary,) = _summaries(cfg)
    fedpav = {s: n / sum(samples.values()) for s, n in samples.items()}
    floats = [k for k, v in deltas["big"].items() if v.dtype.kind == "f"]
    if fednova:
        claims = samples if vouched else {**samples, "big": 176}  # the lower median claim
        paths = {s: TrainConfig(batch_size=TINY["batch_size"]).path_length(n) for s, n in claims.items()}
        norms = {s: np.sqrt(sum(np.sum(deltas[s][k] ** 2) for k in floats)) / paths[s] for s in samples}
        if vouched:
            assert summary["clipped"] == summary["share_capped"] == summary["path_capped"] == []
            shares, scales = fedpav, dict.fromkeys(samples, 1.0)
        else:
            assert summary["clipped"] == summary["share_capped"] == summary["path_capped"] == ["big"]
            shares = {"big": 2 / 3, **{s: samples[s] / 216 / 3 for s in ("mid", "small")}}
            scales = {
                **dict.fromkeys(samples, 1.0),
                "big": 3 * np.median(list(norms.values())) / norms["big"],
            }
        assert summary["weights"] == pytest.approx(shares)
        mean_path = sum(shares[s] * paths[s] for s in samples)
        assert summary["path_length"] == pytest.approx(mean_path, abs=1e-3)
        moved = {
            k: mean_path * sum(shares[s] * scales[s] * deltas[s][k] / paths[s] for s in samples)
            for k in floats
        }
        assert _change(cfg, 0) == pytest.approx(np.sqrt(sum(np.sum(v**2) for v in moved.values())), rel=1e-2)
    elif vouched:
        assert summary["clipped"] == [] and summary["share_capped"] == []
        assert summary["allowances"] == {"big": pytest.approx(800 / 176, abs=1e-4)}
        assert summary["weights"] == pytest.approx(fedpav)
        step = np.sqrt(sum(np.sum(sum(fedpav[s] * deltas[s][k] for s in samples) ** 2) for k in floats))
        assert _change(cfg, 0) == pytest.approx(step, rel=1e-2)
        assert "admission caps bind" not in caplog.text
    else:
        assert summary["clipped"] == ["big"] and summary["share_capped"] == ["big"]
        assert summary["weights"]["big"] == pytest.approx(2 / 3)
        assert _change(cfg, 0) < 0.5 * np.sqrt(sum(np.sum(deltas["big"][k] ** 2) for k in floats))
        (line,) = [r.getMessage() for r in caplog.records if "admission caps bind" in r.getMessage()]
        assert "big (step x" in line and "mid" not in line and "site_samples" in line


def test_hostile_manifests_cannot_stop_or_bloat_the_aggregator(tmp_path, mosquitto_url, caplog):
    cfg = ServeConfig(
        federation="bounds",
        state_dir=tmp_path,
        rounds=1,
        min_sites=3,
        deadline_s=120,
        transfer_idle_s=0.5,
        min_resend_interval_s=1.0,
        final_eval=False,
        **TINY,
    )
    topics = Topics("bounds")
    host, port, _ = parse_url(mosquitto_url)
    # retained junk left (while the aggregator was down) on topics that are never retained
    junk = paho.Client(CallbackAPIVersion.VERSION2, client_id="junk")
    junk.connect(host, port)
    junk.loop_start()
    for topic in (topics.site("c", "update"), topics.global_resend):
        junk.publish(topic, b'{"junk": 1}', qos=1, retain=True).wait_for_publish(10)
    junk.loop_stop()
    junk.disconnect()
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b", "c"])
    global_chunks: list[int] = []
    spy = paho.Client(CallbackAPIVersion.VERSION2, client_id="spy")
    spy.on_message = lambda c, u, m: global_chunks.append(parse_chunk(m.payload)[0].index)
    spy.connect(host, port)
    spy.subscribe(topics.global_chunks, qos=1)
    spy.loop_start()
    try:
        time.sleep(0.5)
        limit = agg.current.limit
        zeros = {k: np.zeros(v.shape, v.numpy().dtype) for k, v in agg.global_state.items()}
        honest = {k: (v + 0.001).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in zeros.items()}

        def manifest(site: str, **blob_fields) -> bytes:
            ref = blob_ref(b"x" * 4096, 1024).model_copy(update=blob_fields)
            m = UpdateManifest(
                site=site,
                round=0,
                base_hash=raw.round.base_hash,
                blob=ref,
                n_samples=10,
                cdw=0.5,
                loss=1.0,
                train_seconds=1.0,
            )
            return encode_message(m)

        for _ in range(300):  # the crash of the issue, replayed: one log line, one summary entry
            raw.publish(topics.site("a", "update"), manifest("a", chunks=150_000))
        # (seen before the next one: a newer manifest of a site supersedes one still waiting)
        assert _wait(lambda: sum("chunks must hold" in a["reason"] for a in raw.acks) >= 1)
        raw.publish(topics.site("a", "update"), manifest("a", size=50 << 30, chunks=51_200))  # 50 GB
        assert _wait(lambda: any("exceeds the limit" in a["reason"] for a in raw.acks))
        replays = sum("chunks must hold" in a["reason"] for a in raw.acks)  # (the inbox skips some)
        assert replays > 1
        bomb = zstandard.ZstdCompressor().compress(b"\0" * (limit * 4))  # a few KB, 4x the model
        raw.blob_update("b", bomb)
        assert _wait(lambda: any(a["site"] == "b" and "over the limit" in a["reason"] for a in raw.acks))
        # a dtype numpy cannot hold (the parser raised KeyError, the update stayed journaled, unacked)
        raw.blob_update("c", save({k: torch.zeros(1, dtype=torch.bfloat16) for k in list(zeros)[:1]}))
        assert _wait(lambda: any(a["site"] == "c" and "dtype BF16" in a["reason"] for a in raw.acks))
        assert not list((tmp_path / "bounds").rglob("updates/c.*"))  # nothing of it kept
        # a resend flood from one selected site: coalesced and rate-limited, off the message thread
        request = {
            "schema_version": 1,
            "kind": "resend",
            "requester": "a",
            "blob_id": raw.round.blob.blob_id,
            "indices": list(range(raw.round.blob.chunks)),
        }
        before = len(global_chunks)
        flood_start = time.monotonic()
        for _ in range(200):
            raw.client.publish(topics.global_resend, json.dumps(request).encode(), qos=0)
        raw.update("a", honest)
        assert _wait(lambda: any(a["site"] == "a" and a["accepted"] for a in raw.acks), timeout=30)
        honest_latency = time.monotonic() - flood_start
        time.sleep(1.5)
        resent = len(global_chunks) - before
        assert resent <= 3 * raw.round.blob.chunks, resent  # 200 requests: at most a few resends
        assert honest_latency < 10
        for s in ("b", "c"):
            raw.update(s, honest)
        thread.join(timeout=60)
        assert not thread.is_alive() and not thread.errors
    finally:
        spy.loop_stop()
        spy.disconnect()
        raw.stop()
    assert _summaries(cfg)[0]["accepted"] == ["a", "b", "c"]
    (replayed,) = [r for r in _summaries(cfg)[0]["rejected"] if "chunks must hold" in r["reason"]]
    assert replayed["site"] == "a" and replayed["count"] == replays
    assert (
        sum("chunks must hold" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING) == 1
    )
    assert "never retained" in caplog.text
    # the aggregator cleared the retained junk: a new subscriber gets nothing on that topic
    got: list[bytes] = []
    late = paho.Client(CallbackAPIVersion.VERSION2, client_id="late")
    late.on_message = lambda c, u, m: got.append(m.payload)
    late.connect(host, port)
    late.subscribe(topics.site("c", "update"), qos=1)
    late.subscribe(topics.global_resend, qos=1)
    late.loop_start()
    time.sleep(1.0)
    late.loop_stop()
    late.disconnect()
    assert got == []
    # disk: the closed round's journaled updates are gone
    assert not (tmp_path / "bounds" / "rounds" / "00000" / "updates").exists()


def test_round_restart_keeps_accepted_work(tmp_path, mosquitto_url):
    cfg = ServeConfig(
        federation="restart",
        state_dir=tmp_path,
        rounds=1,
        min_sites=2,
        quorum=2,
        deadline_s=3,
        max_extensions=0,
        final_eval=False,
        **TINY,
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b", "c"])
    try:
        d = _deltas(agg, 1)
        # a only; b and c silent -> no quorum at the deadline -> restart. (The chunks once overtook the
        # manifest in the aggregator's queues and were dropped: 3 s is less than the resend's idle time)
        blob = encode_state(d, "fp16")
        blob_id = raw.manifest_only("a", blob)
        assert _wait(lambda: "a" in agg.current.manifests, 10)
        for chunk in split_blob(blob, blob_id, 65536):
            raw.publish(Topics(cfg.federation).site("a", "chunks"), chunk)
        assert _wait(lambda: agg.current is not None and agg.current.restarts >= 1, timeout=60)
        assert "a" in agg.current.accepted  # kept across the restart
        raw.update("b", d)
        thread.join(timeout=60)
        assert not thread.is_alive() and not thread.errors
    finally:
        raw.stop()
    summary = _summaries(cfg)[0]
    assert summary["accepted"] == ["a", "b"] and summary["restarts"] >= 1
    assert sum(1 for a in raw.acks if a["accepted"] and a["site"] == "a") == 1  # never asked again


def test_an_upload_that_stopped_does_not_keep_its_site_in_every_restart(tmp_path, mosquitto_url):
    """An upload in progress is kept at a restart only while its site is online and its chunks still come:
    a site that announced and died, or that announces and never sends (an insider), was once kept in every
    restarted selection, and with quorum = the sites drawn the round never closed."""
    cfg = ServeConfig(
        federation="pinned",
        state_dir=tmp_path,
        rounds=1,
        min_sites=2,
        fraction=0.4,
        quorum=2,
        deadline_s=4,
        max_extensions=0,
        final_eval=False,
        **TINY,
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b", "c", "d", "e"])
    try:
        gone, silent = agg.current.selected
        for site in (gone, silent):
            raw.manifest_only(site, b"an upload whose chunks never come")
        assert _wait(lambda: {gone, silent} <= set(agg.current.manifests), 10)
        raw.status(gone, state="offline")  # (its will)
        assert _wait(lambda: agg.current.restarts >= 2, 30)
        assert gone not in agg.current.manifests and silent not in agg.current.manifests
        d, answered = _deltas(agg, 1), set()
        while thread.is_alive() and agg.current is not None:  # every site selected now answers
            now = (agg.current.restarts, tuple(agg.current.selected))
            for site in set(now[1]) - {gone} - answered:
                raw.update(site, d)
                answered.add(site)
            time.sleep(0.1)
        thread.join(timeout=30)
        assert not thread.is_alive() and not thread.errors
    finally:
        agg.stop()
        raw.stop()
    summary = _summaries(cfg)[0]
    assert len(summary["accepted"]) == 2 and gone not in summary["accepted"]


def test_a_site_whose_update_was_rejected_is_out_of_the_round(tmp_path, mosquitto_url):
    """A rejection settles an update: the site never sends it again (docs/protocol.md, rule 4). So the
    round does not wait for it, and a restart does not select it again: a docs-faithful site once
    ignored every re-announcement while the round restarted for good (2026-12-05 client audit)."""
    cfg = ServeConfig(
        federation="rejected",
        state_dir=tmp_path,
        rounds=1,
        min_sites=2,
        quorum=2,
        deadline_s=3,
        max_extensions=0,
        final_eval=False,
        **TINY,
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b", "c"])
    try:
        d = _deltas(agg, 1)
        bad = {k: (v[None] if i == 0 else v) for i, (k, v) in enumerate(d.items())}  # one wrong shape
        raw.update("a", bad)
        raw.update("b", d)
        assert _wait(lambda: "a" in agg.current.failed and "b" in agg.current.accepted, 10)
        assert agg.current.failed["a"].startswith("update rejected: ")
        assert _wait(lambda: agg.current.restarts >= 1, 30)  # c is silent: no quorum
        assert "a" not in agg.current.selected and "c" in agg.current.selected
        raw.update("c", d)
        thread.join(timeout=30)
        assert not thread.is_alive() and not thread.errors
    finally:
        agg.stop()
        raw.stop()
    summary = _summaries(cfg)[0]
    assert summary["accepted"] == ["b", "c"] and "a" in summary["failed"]


def test_a_rejected_site_that_uploads_another_update_is_waited_for(tmp_path, mosquitto_url):
    """docs/protocol.md, UpdateAck: a rejected site "may still send another manifest ... one whose upload
    is under way brings it back into the round". The round closed at its quorum with that upload still
    arriving, and the update was lost (2026-12-05 spec review)."""
    cfg = ServeConfig(
        federation="uploads-again", state_dir=tmp_path, rounds=1, min_sites=2, quorum=1, deadline_s=60,
        final_eval=False, **TINY,
    )  # fmt: skip
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b"])
    try:
        d = _deltas(agg, 1)
        raw.update("b", d, base_hash="0" * 64)
        assert _wait(lambda: any(a["site"] == "b" and not a["accepted"] for a in raw.acks), 10)
        blob = encode_state(_deltas(agg, 2), "fp16")
        ref = blob_ref(blob, 65536)
        manifest = UpdateManifest(
            site="b", round=0, base_hash=raw.round.base_hash, blob=ref, n_samples=10, cdw=0.5, loss=1.0,
            train_seconds=1.0,
        )  # fmt: skip
        raw.publish(Topics(cfg.federation).site("b", "update"), encode_message(manifest))
        chunks = list(split_blob(blob, ref.blob_id, 65536))
        for chunk in chunks[:-1]:
            raw.publish(Topics(cfg.federation).site("b", "chunks"), chunk)
        assert _wait(lambda: "b" in agg.current.manifests and "b" not in agg.current.failed, 10)
        raw.update("a", d)
        assert _wait(lambda: "a" in agg.current.accepted, 10)
        time.sleep(1.0)
        assert thread.is_alive()  # waiting for b's upload, not closed at the quorum
        raw.publish(Topics(cfg.federation).site("b", "chunks"), chunks[-1])
        thread.join(timeout=30)
        assert not thread.is_alive() and not thread.errors
    finally:
        agg.stop()
        raw.stop()
    assert _summaries(cfg)[0]["accepted"] == ["a", "b"]


def test_a_restarted_aggregator_does_not_wait_for_a_site_that_failed_the_round(tmp_path, mosquitto_url):
    """docs/protocol.md: a failed site is not waited for in that round, "aggregator restarts included".
    The journal kept only who failed once, for the draw: a resumed round waited out its deadline for a
    site that had said it cannot take part (2026-12-05 spec review)."""
    cfg = ServeConfig(
        federation="failed-resumed", state_dir=tmp_path, rounds=1, min_sites=2, quorum=1, deadline_s=120,
        final_eval=False, **TINY,
    )  # fmt: skip
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b"])
    raw.status("b", state="failed", round=0, reason="OSError: disk full")
    try:
        assert _wait(lambda: "b" in agg.current.failed, 10)
        agg.stop()
        thread.join(timeout=30)
        again, raw2, thread2 = _start(cfg, mosquitto_url, [])
        try:
            assert again.current.failed == {"b": "OSError: disk full"}
            raw2.update("a", _deltas(again, 1))
            thread2.join(timeout=30)  # (the deadline is 120 s: not waited out for b)
            assert not thread2.is_alive() and not thread2.errors
        finally:
            again.stop()
            raw2.stop()
    finally:
        agg.stop()
        raw.stop()
    summary = _summaries(cfg)[0]
    assert summary["accepted"] == ["a"] and "b" in summary["failed"]


def test_a_failed_site_is_dropped_at_once_and_disk_stays_bounded(tmp_path, mosquitto_url):
    cfg = ServeConfig(
        federation="failed",
        state_dir=tmp_path,
        rounds=2,
        min_sites=3,
        quorum=2,
        deadline_s=120,
        keep_checkpoints=2,
        final_eval=False,
        **TINY,
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b", "c"])
    try:
        d = _deltas(agg, 1)
        raw.status("c", state="failed", round=0, reason="ValueError: disk full")
        opened = time.monotonic()
        raw.update("a", d)
        raw.update("b", d)
        assert _wait(lambda: agg.completed == 0, timeout=100)
        assert time.monotonic() - opened < 100  # closed without waiting out the 120 s deadline
        raw.status("c")  # back online: selected again in round 1
        assert _wait(lambda: raw.round.round == 1, timeout=30)
        assert raw.round.selected == ["a", "b", "c"]
        for s in raw.round.selected:
            raw.update(s, d)
        thread.join(timeout=60)
        assert not thread.is_alive() and not thread.errors
    finally:
        raw.stop()
    summaries = _summaries(cfg)
    assert summaries[0]["failed"] == {"c": "ValueError: disk full"} and summaries[0]["accepted"] == ["a", "b"]
    assert summaries[1]["accepted"] == ["a", "b", "c"]
    rounds = sorted(p.name for p in (tmp_path / "failed" / "rounds").iterdir())
    assert rounds == ["00000", "00001"]  # keep_checkpoints = 2, no journaled updates left


def test_a_site_that_failed_for_a_moment_is_selected_again_when_the_round_needs_it(tmp_path, mosquitto_url):
    """quorum = min_sites = 3: site c fails round 0 (a data folder briefly missing); the round restarts and
    selects c again at once, instead of waiting `wait_for_sites_s` for a third site and giving up."""
    cfg = ServeConfig(
        federation="moment",
        state_dir=tmp_path,
        rounds=1,
        min_sites=3,
        quorum=3,
        deadline_s=120,
        wait_for_sites_s=20,
        final_eval=False,
        **TINY,
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b", "c"])
    try:
        d = _deltas(agg, 1)
        raw.status("c", state="failed", round=0, reason="DatasetLayoutError: data set folder not found")
        raw.update("a", d)
        raw.update("b", d)
        assert _wait(lambda: any(a["site"] == "b" for a in raw.acks), timeout=30)
        # the restarted round's RoundStart selects c again: the agent, failed, goes online and trains
        assert _wait(lambda: agg.current is not None and agg.current.restarts >= 1, timeout=30)
        raw.update("c", d)
        thread.join(timeout=60)
        assert not thread.is_alive() and not thread.errors
    finally:
        raw.stop()
    summary = _summaries(cfg)[0]
    assert summary["accepted"] == ["a", "b", "c"] and summary["restarts"] == 1


def test_a_site_that_failed_a_round_is_not_selected_for_it_again_by_saying_online(tmp_path, mosquitto_url):
    """A site that failed round 0 and then sends "online" (a crashing site reconnecting) was selected for
    round 0 again without limit (2026-12-04 audit); now only the retry rule brings it back (at most
    twice), and the failure is journaled with the open round, so a restarted aggregator keeps it."""
    cfg = ServeConfig(
        federation="flap", state_dir=tmp_path, rounds=2, min_sites=2, deadline_s=60, final_eval=False, **TINY
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b", "c"])
    try:
        raw.status("c", state="failed", round=0, reason="disk full")
        assert _wait(lambda: "c" in agg.current.failed, 10)
        raw.status("c", state="online", round=0)
        assert _wait(lambda: agg.online.get("c", ("",))[0] == "online", 10)
        failed = agg.current.failed_once
        assert agg._eligible(failed) == ["a", "b"] and agg._eligible(failed, retry={"c"}) == ["a", "b", "c"]
        assert json.loads((tmp_path / "flap" / "open.json").read_text())["failed"] == ["c"]
        # a failure for a round that is not open (a retained status of an earlier run) counts for nothing
        raw.status("d", state="failed", round=1, reason="an earlier run")
        assert _wait(lambda: "d" in agg.online, 10)
        assert agg._eligible(failed) == ["a", "b", "d"] and agg.current.failed_once == {"c"}
        agg.stop()
        thread.join(timeout=30)
        again = Aggregator(cfg, mosquitto_url)
        thread = threading.Thread(target=again.run, daemon=True)
        thread.start()
        assert _wait(lambda: again.current is not None, 30)
        assert again.current.failed_once == {"c"} and again._eligible(again.current.failed_once) == [
            "a",
            "b",
            "d",
        ]
        again.stop()
        thread.join(timeout=30)
    finally:
        raw.stop()


def test_the_final_evaluation_waits_for_statuses_that_arrive_after_the_aggregator_starts(
    tmp_path, mosquitto_url
):
    """A restart after the last round, over a slow link: the sites' retained statuses arrive a moment after
    the aggregator connected. It waits for them (up to STATUS_SETTLE_S) instead of deciding at once that
    no site is online and skipping the evaluation."""
    cfg = ServeConfig(
        federation="late", state_dir=tmp_path, rounds=1, min_sites=1, deadline_s=60, final_eval=False, **TINY
    )
    topics = Topics("late")
    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])
    try:
        raw.update("a", _deltas(agg, 1))
        thread.join(timeout=60)
        assert not thread.is_alive() and not thread.errors
        raw.publish(topics.status("a"), b"", retain=True)  # no status on the broker when it starts again
        again = Aggregator(cfg.model_copy(update={"final_eval": True}), mosquitto_url)
        thread = threading.Thread(target=again.run, daemon=True)
        thread.start()
        time.sleep(2.0)
        raw.status("a")
        assert _wait(lambda: raw.round is not None and raw.round.round == 1 and not raw.round.train, 30)
        metrics = {"rank1": 50.0, "mAP": 40.0, "valid_queries": 4}
        doc = {"schema_version": 1, "kind": "eval", "site": "a", "round": 1, "base_hash": raw.round.base_hash}
        raw.publish(topics.site("a", "eval"), json.dumps({**doc, "metrics": metrics}).encode())
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        raw.stop()
    records = [json.loads(line) for line in (tmp_path / "late" / "metrics.jsonl").read_text().splitlines()]
    [evaluation] = [r for r in records if r.get("kind") == "evaluation"]
    assert evaluation["reported"] == ["a"] and evaluation["round"] == 0


def test_a_kill_between_the_commit_and_the_metrics_keeps_the_rounds_summary(tmp_path, mosquitto_url):
    """The aggregator dies after round 0's checkpoint is committed, before its summary reaches
    metrics.jsonl: the restart records the summary (once) and deletes the round's journaled updates."""
    cfg = ServeConfig(
        federation="kp", state_dir=tmp_path, rounds=1, min_sites=1, deadline_s=60, final_eval=False, **TINY
    )

    class Killed(BaseException):
        pass

    def killed(records: list[dict]) -> None:
        raise Killed

    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])
    agg._record = killed  # type: ignore[method-assign] (the kill point: after save_global)
    try:
        raw.update("a", _deltas(agg, 1))
        thread.join(timeout=60)
        assert not thread.is_alive() and isinstance(thread.errors[0], Killed)
    finally:
        raw.stop()
    run = tmp_path / "kp"
    assert (run / "rounds" / "00000" / "global.safetensors").is_file()  # committed
    assert any((run / "rounds" / "00000" / "updates").iterdir())
    assert not (run / "metrics.jsonl").exists()  # nothing recorded before the kill
    again = Aggregator(cfg, mosquitto_url)
    assert again.completed == 0
    summaries = _summaries(cfg)
    assert len(summaries) == 1 and summaries[0]["accepted"] == ["a"]
    assert not (run / "rounds" / "00000" / "updates").exists()
    Aggregator(cfg, mosquitto_url)  # a second restart adds nothing
    assert len(_summaries(cfg)) == 1


def _deploying(tiny_federation, tmp_path, federation: str) -> ServeConfig:
    """One round, deployed when it closes, no final evaluation."""
    return ServeConfig(
        federation=federation,
        state_dir=tmp_path,
        rounds=1,
        min_sites=1,
        deadline_s=60,
        final_eval=False,
        deploy_every=1,
        deploy_images=tiny_federation / "sites" / "site00" / "query",
        **TINY,
    )


def test_after_the_run_the_last_deployment_is_sent_while_a_site_without_it_asks(
    tiny_federation, tmp_path, mosquitto_url, monkeypatch, caplog
):
    """A site killed as the last deployment went out restarts after `serve` has exited: nobody sent the
    file any more, and it served an older model for good (2026-12-05 chaos audit). `serve` keeps sending
    it while an online site that lacks it asks for it, and exits once that site serves it."""
    import cloud.server
    from cloud.deploy import latest_deployment
    from protocol.messages import ChunkRequest

    monkeypatch.setattr(cloud.server, "FINAL_DEPLOY_QUIET_S", 3.0)
    caplog.set_level(logging.INFO, logger="cloud.server")
    cfg = _deploying(tiny_federation, tmp_path, "fd")
    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])
    try:
        raw.update("a", _deltas(agg, 1))
        assert _wait(lambda: agg.phase == "done", 120)
        manifest = latest_deployment(tmp_path / "fd")
        assert manifest is not None and manifest.version == "fd/round-0"
        request = encode_message(ChunkRequest(requester="a", blob_id=manifest.blob.blob_id, indices=[0]))
        for _ in range(6):  # 6 s of a site asking (taken every 2 s: the rate limit), twice the quiet time
            raw.publish(Topics("fd").deploy_resend, request)
            time.sleep(1.0)
        assert thread.is_alive()  # still sending it
        raw.status("a", deployed=manifest.version)
        thread.join(timeout=30)
        assert not thread.is_alive() and not thread.errors
    finally:
        agg.stop()
        raw.stop()
    assert "sending the last deployment fd/round-0 while a may still ask for it" in caplog.text
    assert "do not serve the last deployment" not in caplog.text


def test_a_deployment_cut_short_by_a_kill_is_made_at_the_restart(
    tiny_federation, tmp_path, mosquitto_url, monkeypatch, caplog
):
    import cloud.server
    from cloud.deploy import latest_deployment

    monkeypatch.setattr(cloud.server, "FINAL_DEPLOY_QUIET_S", 0.5)  # ("a" never asks for the deployment)
    cfg = _deploying(tiny_federation, tmp_path, "dk")

    class Killed(BaseException):
        pass

    def killed(r: int) -> None:
        raise Killed

    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])
    agg._maybe_deploy = killed  # type: ignore[method-assign] (killed as round 0's deployment began)
    try:
        raw.update("a", _deltas(agg, 1))
        thread.join(timeout=60)
        assert not thread.is_alive() and isinstance(thread.errors[0], Killed)
        assert latest_deployment(tmp_path / "dk") is None
        again = Aggregator(cfg, mosquitto_url)
        again.run()  # no round left: it deploys round 0, then ends the run
    finally:
        raw.stop()
    deployed = latest_deployment(tmp_path / "dk")
    assert deployed is not None and deployed.round == 0 and deployed.version == "dk/round-0"
    assert "a do not serve the last deployment dk/round-0" in caplog.text  # (online, and never asked)

    # a rollback by hand to the initial model, with the aggregator's clock stepped back a day: the
    # manifest is still newer than the one the sites serve, and a restart of `serve` does not undo it
    import cloud.deploy

    day_ago = deployed.created - 86400
    monkeypatch.setattr(cloud.deploy, "time", SimpleNamespace(time=lambda: day_ago))
    operator = Endpoint(mosquitto_url, Topics("dk"), "aggregator", "aggregator", announce=False).start()
    try:
        images = sorted((tiny_federation / "sites" / "site00" / "query").iterdir())
        rollback = cloud.deploy.deploy_round(operator, tmp_path / "dk", images, -1)
    finally:
        operator.stop()
    assert rollback.round == -1 and rollback.created > deployed.created
    monkeypatch.undo()
    Aggregator(cfg, mosquitto_url).run()
    assert latest_deployment(tmp_path / "dk") == rollback


def test_a_deployment_whose_manifest_the_broker_did_not_take_goes_out_with_the_reconnect(
    tiny_federation, tmp_path, mosquitto_url, monkeypatch, caplog
):
    """The broker went away as a round's deployment was published: the aggregator said "round 0 not
    deployed" though it had recorded it (latest.json) and published its manifest again at the reconnect,
    and a restart exported and deployed the round a second time (2026-12-05 chaos audit F4)."""
    import cloud.server
    from cloud.deploy import latest_deployment, scheduled_round

    monkeypatch.setattr(cloud.server, "FINAL_DEPLOY_QUIET_S", 0.5)
    caplog.set_level(logging.INFO)
    cfg = _deploying(tiny_federation, tmp_path, "ua")
    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])
    publish = agg.endpoint.publish

    def broker_away(topic: str, payload: bytes, retain: bool = False):
        if topic != Topics("ua").deploy:
            return publish(topic, payload, retain)
        return SimpleNamespace(wait_for_publish=lambda timeout: None, is_published=lambda: False)

    agg.endpoint.publish = broker_away  # type: ignore[method-assign]
    try:
        raw.update("a", _deltas(agg, 1))
        thread.join(timeout=120)
        assert not thread.is_alive() and not thread.errors
        manifest = latest_deployment(tmp_path / "ua")
        assert manifest is not None and manifest.version == "ua/round-0"
        assert scheduled_round(tmp_path / "ua") == 0
        assert "round 0 deployed; the broker is away: its manifest goes out when it is back" in caplog.text
        assert "not deployed" not in caplog.text
        caplog.clear()
        Aggregator(cfg, mosquitto_url).run()  # a restart: a connection, and no second deployment
        assert "deployment did not finish before a restart" not in caplog.text
        assert latest_deployment(tmp_path / "ua") == manifest
        got: list[bytes] = []
        on_deploy = {Topics("ua").deploy: lambda topic, payload: got.append(payload)}
        watcher = Endpoint(mosquitto_url, Topics("ua"), "w", "site", on_deploy, announce=False).start()
        try:
            assert _wait(lambda: got, 10) and parse_message(got[-1]) == manifest  # retained: it went out
        finally:
            watcher.stop()
    finally:
        agg.stop()
        raw.stop()


def test_two_deployers_at_once_leave_the_sites_a_model_they_can_fetch(
    tiny_federation, tmp_path, mosquitto_url, monkeypatch
):
    """Two operators deploy at the same moment (fp32 and fp16 of the initial model) and the first one's
    disk is slow after it records latest.json: the second waits for the first's manifest to be out, so
    the retained manifest the sites follow and latest.json, from which their chunk requests are
    answered, name the same model (they named different ones: no site could fetch the deployment)."""
    import cloud.deploy
    from cloud.deploy import latest_deployment
    from protocol.messages import Deployment, parse_message

    Aggregator(_deploying(tiny_federation, tmp_path, "two"), mosquitto_url)  # the run's record, round -1
    images = sorted((tiny_federation / "sites" / "site00" / "query").iterdir())
    done = {p: threading.Event() for p in ("fp32", "fp16")}
    first: list[str] = []
    real_write = cloud.deploy.atomic_write

    def slow_disk(path, data) -> None:
        real_write(path, data)
        if path.name == "latest.json" and not first:
            first.append(threading.current_thread().name)
            other = "fp16" if first[0] == "fp32" else "fp32"
            done[other].wait(timeout=5)  # without turns, the other deployer finishes meanwhile

    monkeypatch.setattr(cloud.deploy, "atomic_write", slow_disk)

    def operator(precision: str) -> None:
        ep = Endpoint(mosquitto_url, Topics("two"), f"op-{precision}", "aggregator", announce=False).start()
        try:
            cloud.deploy.deploy_round(ep, tmp_path / "two", images, -1, precision)  # type: ignore[arg-type]
        finally:
            ep.stop()
            done[precision].set()

    threads = [threading.Thread(target=operator, args=(p,), name=p) for p in done]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(e.is_set() for e in done.values()) and first
    host, port, _ = parse_url(mosquitto_url)
    got: list[bytes] = []
    site = paho.Client(CallbackAPIVersion.VERSION2, client_id="a-site")
    site.on_message = lambda c, u, m: got.append(m.payload)
    site.connect(host, port)
    site.subscribe(Topics("two").deploy, qos=1)
    site.loop_start()
    assert _wait(lambda: got, 10)
    site.loop_stop()
    site.disconnect()
    retained = parse_message(got[0], Deployment)
    recorded = latest_deployment(tmp_path / "two")
    assert recorded == retained and retained.blob.encoding != first[0]  # the later deployer's model


def test_a_damaged_checkpoint_is_set_aside_and_the_sites_are_told_by_a_new_run_id(tmp_path, mosquitto_url):
    cfg = ServeConfig(
        federation="dmg", state_dir=tmp_path, rounds=2, min_sites=1, deadline_s=60, final_eval=False, **TINY
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])
    first_id = raw.round.run_id
    try:
        raw.update("a", _deltas(agg, 1))
        assert _wait(lambda: raw.round.round == 1, 30)
        raw.update("a", _deltas(agg, 2))
        thread.join(timeout=30)
        assert not thread.is_alive() and not thread.errors
    finally:
        raw.stop()
    assert len(first_id) == 16 and raw.round.run_id == first_id  # one run: one id
    with pytest.raises(ValueError, match=r"2 rounds are done .* more than rounds = 1"):
        Aggregator(cfg.model_copy(update={"rounds": 1}), mosquitto_url)  # (a config edited down)
    ckpt = tmp_path / "dmg" / "rounds" / "00001" / "global.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a disk that lost writes
    again = Aggregator(cfg, mosquitto_url)
    assert again.completed == 0  # round 1 is trained again
    assert (tmp_path / "dmg" / "rounds" / "00001.damaged" / "global.safetensors").is_file()
    assert again.run_id != first_id  # round 1 was acknowledged to site a: it must train it again
    assert [s["round"] for s in _summaries(cfg)] == [0]  # round 1's summary goes: it is made again
    # a second start (and every later one) reads past the folder set aside; so do the model finders
    third = Aggregator(cfg, mosquitto_url)
    assert third.completed == 0 and third.run_id == again.run_id
    assert find_model(tmp_path / "dmg") == tmp_path / "dmg" / "rounds" / "00000" / "global.safetensors"
    assert load_round(tmp_path / "dmg")[0] == 0


def test_a_lost_journaled_update_makes_the_sites_train_the_round_again(tmp_path, mosquitto_url):
    cfg = ServeConfig(
        federation="lost", state_dir=tmp_path, rounds=1, min_sites=2, quorum=2, deadline_s=60, **TINY
    )
    cfg = cfg.model_copy(update={"final_eval": False})
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b"])
    first_id = raw.round.run_id
    try:
        d = _deltas(agg, 1)
        raw.update("a", d)
        assert _wait(lambda: any(a["site"] == "a" and a["accepted"] for a in raw.acks), 30)
        agg.stop()
        thread.join(timeout=30)
        blob = tmp_path / "lost" / "rounds" / "00000" / "updates" / "a.blob"
        blob.write_bytes(blob.read_bytes()[:100])  # damaged after the ack
        again = Aggregator(cfg, mosquitto_url)
        thread = threading.Thread(target=again.run, daemon=True)
        thread.start()
        # site a's acknowledged update is gone: the round is announced under a new run id, which tells
        # a to train it again (docs/protocol.md, rule 0)
        assert _wait(lambda: raw.round.run_id != first_id, 30)
        assert not (tmp_path / "lost" / "rounds" / "00000" / "updates" / "a.blob").exists()
        assert all(ack["accepted"] for ack in raw.acks)  # the aggregator's damage is not blamed on site a
        raw.update("a", d)
        raw.update("b", d)
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        raw.stop()
    assert _summaries(cfg)[0]["accepted"] == ["a", "b"] and _summaries(cfg)[0]["rejected"] == []


def test_unwritable_state_dir_stops_cleanly_without_acking(tmp_path, mosquitto_url, caplog):
    cfg = ServeConfig(
        federation="ro", state_dir=tmp_path, rounds=1, min_sites=1, deadline_s=60, final_eval=False, **TINY
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])
    try:
        (tmp_path / "ro" / "rounds" / "00000").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ro" / "rounds" / "00000" / "updates").write_text("not a folder")  # root ignores chmod
        raw.update("a", _deltas(agg, 1))
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        raw.stop()
    assert len(thread.errors) == 1 and isinstance(thread.errors[0], StateDirError)
    assert not any(a["accepted"] for a in raw.acks)  # never acknowledged what it could not journal
    assert caplog.text.count("cannot journal the update of a") == 1


@pytest.mark.parametrize("where", ["add", "__init__"])
def test_a_full_state_dir_under_an_upload_stops_cleanly(tmp_path, mosquitto_url, caplog, monkeypatch, where):
    """Uploads are spooled beside the journal: a spool that cannot be written (a full or read-only state
    dir) stops the aggregator with one error line, as any other write there; it was a warning per chunk,
    every site sent its whole update again every 2 s, and with a few KB left for the round's own record
    the round restarted for good (2026-12-05 chaos audit)."""
    cfg = ServeConfig(
        federation="full", state_dir=tmp_path, rounds=1, min_sites=1, deadline_s=60, final_eval=False, **TINY
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(InboundBlob, where, full)
    try:
        raw.update("a", _deltas(agg, 1))
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        raw.stop()
    assert len(thread.errors) == 1 and isinstance(thread.errors[0], StateDirError)
    assert not any(a["accepted"] for a in raw.acks)
    assert caplog.text.count("cannot spool an upload in") == 1


def test_a_chunk_count_or_size_attack_is_a_clear_reason_not_a_crash():
    """The exact manifests of the issue, checked by the admission rule alone (no broker)."""
    ref = blob_ref(b"x" * 4096, 1024).model_copy(update={"chunks": 150_000})
    assert "chunks must hold" in (check_ref(ref, 1 << 30) or "")
    big = ref.model_copy(update={"size": 50 << 30, "chunks": 51_200})
    assert "exceeds the limit" in (check_ref(big, 100 << 20) or "")
    chunks = list(split_blob(b"y" * 5000, "ab" * 16, 1024))
    assert len(chunks) == 5


def test_an_earlier_runs_retained_run_end_is_cleared_when_a_run_starts(tmp_path, mosquitto_url):
    """A new run (or one extended by raising `rounds`) waits for its sites before round 0 opens; the last
    run's retained RunEnd would meanwhile tell every site that starts that the run is over (agents with
    exit_when_done left, and the run waited for them). The aggregator clears it as it starts."""
    topics = Topics("ended")
    host, port, _ = parse_url(mosquitto_url)
    seen: list[bytes] = []
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="watcher")
    watcher.on_message = lambda c, u, m: seen.append(m.payload)
    watcher.connect(host, port)
    watcher.loop_start()
    old = encode_message(RunEnd(federation="ended", rounds=3))
    watcher.publish(topics.round, old, qos=1, retain=True).wait_for_publish(10)
    watcher.subscribe(topics.round, qos=1)
    assert _wait(lambda: seen == [old])
    cfg = ServeConfig(federation="ended", state_dir=tmp_path, rounds=2, min_sites=3, deadline_s=60, **TINY)
    agg = Aggregator(cfg, mosquitto_url)
    thread = threading.Thread(target=agg.run, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: seen[-1:] == [b""], timeout=30)  # cleared, while it waits for 3 sites
        assert agg.current is None
        late: list[bytes] = []
        other = paho.Client(CallbackAPIVersion.VERSION2, client_id="late-site")
        other.on_message = lambda c, u, m: late.append(m.payload)
        other.connect(host, port)
        other.subscribe(topics.round, qos=1)
        other.loop_start()
        time.sleep(1.0)
        other.loop_stop()
        other.disconnect()
        assert late == []  # a site starting now sees no RunEnd
    finally:
        agg.stop()
        thread.join(timeout=30)
        watcher.loop_stop()
        watcher.disconnect()
    assert not thread.is_alive()


def test_under_clustering_a_size_claim_weighs_no_group_beyond_the_median(tmp_path, mosquitto_url):
    """Client clustering weights the group models by their sites' sizes: an insider's claim of
    MAX_SAMPLES once gave its group all the weight of the global model, in that round and every later
    one (2026-12-05 insider audit). A size nobody vouched for counts as at most the lower median of all."""
    cfg = ServeConfig(
        federation="claims",
        state_dir=tmp_path,
        rounds=2,
        min_sites=5,
        quorum=5,
        deadline_s=60,
        final_eval=False,
        cluster=ClusterConfig(groups=2, after=1, sketch_size=4096),
        **TINY,
    )
    sites = ["a", "b", "c", "d", "evil"]
    agg, raw, thread = _start(cfg, mosquitto_url, sites)
    try:
        way = {s: _deltas(agg, 1 if s in ("a", "b") else 2) for s in sites}  # two kinds of data
        for i, s in enumerate(sites):
            noise = _deltas(agg, 10 + i, 0.001)
            raw.update(s, {k: v + noise[k] for k, v in way[s].items()})
        assert _wait(lambda: raw.round is not None and raw.round.round == 1, 60)
        for i, s in enumerate(sites):
            base = raw.round.for_site(s).base_hash
            claim, scale = (MAX_SAMPLES, 0.05) if s == "evil" else (10, 0.01)
            raw.update(s, _deltas(agg, 20 + i, scale), n_samples=claim, base_hash=base)
        thread.join(timeout=60)
        assert not thread.is_alive() and not thread.errors
    finally:
        agg.stop()
        raw.stop()
    summary = _summaries(cfg)[1]
    groups = summary["groups"]
    assert groups["a"] == groups["b"] != groups["c"] == groups["d"] == groups["evil"]
    root = cfg.state_dir / cfg.federation / "rounds" / "00001"
    with safe_open(str(root / "groups.safetensors"), framework="pt") as f:
        models = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    final = load_file(str(root / "global.safetensors"))
    size = {groups["a"]: 20, groups["evil"]: 30}  # evil's claim counts as the median, 10
    for key, value in final.items():
        if value.dtype.is_floating_point:
            expected = sum(n * models[f"group/{g}/{key}"].double() for g, n in size.items()) / 50
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_finite_but_huge_delta_spoils_neither_kd_nor_a_restart(tiny_federation, tmp_path, mosquitto_url):
    """Under KD, an insider's delta of 3e38 (finite, so valid on the wire; a model that is not finite on
    the public set) is acknowledged, clipped like any delta, and its teacher is the clipped model: KD runs
    and the global model stays finite. Teachers are made at close, so a restart that finds the update
    journaled resumes (it used to exit at every start: the teacher was made when the update came in)."""
    cfg = ServeConfig(
        federation="kdx",
        state_dir=tmp_path,
        rounds=2,
        min_sites=3,
        quorum=3,
        deadline_s=60,
        final_eval=False,
        kd_enabled=True,
        public=tiny_federation / "public",
        kd=KDConfig(batch_size=8, max_batches=2),
        **TINY,
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b", "x"])
    first_id = raw.round.run_id
    try:
        raw.update("a", _deltas(agg, 1))
        raw.update("b", _deltas(agg, 2))
        huge = {
            k: np.full_like(v, 3e38)
            if k.startswith("embedding") and v.dtype.kind == "f"
            else np.zeros_like(v)
            for k, v in _deltas(agg, 3).items()
        }
        raw.blob_update("x", encode_state(huge, "fp32"))
        assert _wait(lambda: agg.completed == 0, 60)
        raw.update("a", _deltas(agg, 4))
        raw.blob_update("x", encode_state(huge, "fp32"))
        assert _wait(lambda: sum(a["accepted"] and a["round"] == 1 for a in raw.acks) == 2, 30)
        agg.stop()  # a restart with the hostile update journaled
        thread.join(timeout=30)
        assert not thread.errors
        again = Aggregator(cfg, mosquitto_url)
        # the norm bound's reference survives the restart: round 0's lower median norm, from its summary
        assert again.reference_norm == pytest.approx(sorted(_summaries(cfg)[0]["norms"].values())[1])
        thread = threading.Thread(target=again.run, daemon=True)
        thread.start()
        assert _wait(lambda: again.current is not None and sorted(again.current.accepted) == ["a", "x"], 30)
        raw.update("b", _deltas(again, 5))
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        raw.stop()
    assert raw.round.run_id == first_id  # nothing acknowledged was lost
    summaries = _summaries(cfg)
    assert [s["accepted"] for s in summaries] == [["a", "b", "x"]] * 2
    for s in summaries:  # KD ran, or made the model worse and was refused: the handler never failed
        assert s["clipped"] == ["x"], s
        assert s["kd"].get("batches") == 2 or "KD loss is" in s["kd"].get("diverged", ""), s
    final = load_file(str(tmp_path / "kdx" / "rounds" / "00001" / "global.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values() if v.dtype.is_floating_point)


def test_an_update_announced_before_the_round_opens_is_not_settled_then(tmp_path, mosquitto_url):
    """A site re-announces its unacknowledged update while a restarted aggregator is up but has not
    opened the round yet (it waits for its sites, or resumes). A rejection then would settle the update
    (the site drops it and sits the round out); no answer is the answer, and the update announced again
    once the round is open is accepted."""
    cfg = ServeConfig(
        federation="early", state_dir=tmp_path, rounds=1, min_sites=2, deadline_s=60, final_eval=False, **TINY
    )
    agg = Aggregator(cfg, mosquitto_url)
    raw = RawSite(mosquitto_url, Topics(cfg.federation))
    raw.status("a")
    thread = threading.Thread(target=agg.run, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: agg.endpoint.connected.is_set(), 30)
        raw.round = SimpleNamespace(round=0, base_hash="0" * 64)  # (no RoundStart seen yet)
        early = raw.update("a", _deltas(agg, 3))
        raw.round = None
        time.sleep(2)
        assert agg.current is None and not any(a["blob_id"] == early for a in raw.acks)
        raw.status("b")
        assert _wait(lambda: raw.round is not None and raw.round.round == 0, 30)
        blob = raw.update("a", _deltas(agg, 1))
        assert _wait(lambda: any(a["blob_id"] == blob and a["accepted"] for a in raw.acks), 30)
        raw.update("b", _deltas(agg, 2))
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        agg.stop()
        raw.stop()
    assert not any(a["blob_id"] == early for a in raw.acks)
    assert _summaries(cfg)[0]["accepted"] == ["a", "b"]


def test_a_journal_is_input_too_updates_are_judged_again_and_stale_ones_never_count(tmp_path, mosquitto_url):
    """The journaled updates of the open round pass the same rules at a resume as when they came (one
    filed under another site's name is dropped); updates journaled for a round whose record is lost
    or for another base never count, and acknowledged ones for this base that cannot count make the
    sites train it again (a new run id)."""
    cfg = ServeConfig(
        federation="judged", state_dir=tmp_path, rounds=1, min_sites=2, quorum=2, deadline_s=60, **TINY
    )
    cfg = cfg.model_copy(update={"final_eval": False})
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b"])
    try:
        blob = raw.update("a", _deltas(agg, 1))
        assert _wait(lambda: any(a["blob_id"] == blob and a["accepted"] for a in raw.acks), 30)
        agg.stop()
        thread.join(timeout=30)
        updates = tmp_path / "judged" / "rounds" / "00000" / "updates"
        for suffix in (".json", ".blob"):  # a's update filed under a site round 0 never selected
            (updates / f"zz{suffix}").write_bytes((updates / f"a{suffix}").read_bytes())
        first_id = agg.run_id
        again = Aggregator(cfg, mosquitto_url)
        thread = threading.Thread(target=again.run, daemon=True)
        thread.start()
        # (the resumed round is set up under the aggregator's lock: wait for all of it)
        assert _wait(lambda: again.current is not None and again.run_id != first_id, 30)
        with again.lock:
            assert set(again.current.accepted) == {"a"} and not (updates / "zz.json").exists()
        again.stop()
        thread.join(timeout=30)
        (tmp_path / "judged" / "open.json").write_text('{"round": 0, "sel')  # the round's record, torn
        metrics = tmp_path / "judged" / "metrics.jsonl"
        with open(metrics, "a") as f:
            f.write('{"round": -1, "kind": "rou')  # and a torn metrics line
        third = Aggregator(cfg, mosquitto_url)
        thread = threading.Thread(target=third.run, daemon=True)
        thread.start()
        assert _wait(lambda: third.current is not None, 30)
        with third.lock:  # a's update, journaled for this base and a selected again: it counts
            assert set(third.current.accepted) == {"a"} and third.run_id == again.run_id
        raw.update("a", _deltas(agg, 1))  # (announced again: a duplicate, acknowledged)
        raw.update("b", _deltas(agg, 2))
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        raw.stop()
    lines = (tmp_path / "judged" / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == '{"round": -1, "kind": "rou' and json.loads(lines[1])["accepted"] == ["a", "b"]


def test_after_a_reconnect_only_sites_that_speak_again_are_selected(tmp_path, mosquitto_url):
    """A broker restarted without persistence loses the will of a site that died meanwhile: the site's
    last word stays "online" at the aggregator. After the aggregator's reconnect, a site counts again
    only once its status comes again (live sites send it when they reconnect)."""
    cfg = ServeConfig(federation="ghost", state_dir=tmp_path, rounds=1, min_sites=2, deadline_s=60, **TINY)
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b"])
    try:
        raw.status("gone", state="offline")  # a site that died before the aggregator started
        assert _wait(lambda: "gone" in agg.online, 10)
        seen = {s["site"]: s["last_seen"] for s in agg.view()["sites"]}
        assert seen["gone"] is None and seen["a"] is not None  # (it showed the aggregator's start time)
        assert agg._eligible() == ["a", "b"]
        agg._republish_round()  # what the endpoint runs after every (re)connect
        assert agg._eligible() == []
        raw.status("a")  # a reconnects; b died while the broker was down
        assert _wait(lambda: agg._eligible() == ["a"], 10)
    finally:
        agg.stop()
        thread.join(timeout=30)
        raw.stop()


def test_a_site_status_under_a_reserved_node_name_is_never_a_site(tmp_path, mosquitto_url):
    """`aggregator` and `operator` name other roles' nodes (docs/protocol.md): a status that claims one of
    them as a site is dropped, so it can never be selected."""
    cfg = ServeConfig(federation="reserved", state_dir=tmp_path, rounds=1, min_sites=2, deadline_s=60, **TINY)
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b"])
    try:
        for name in ("aggregator", "operator", "c"):
            raw.status(name)
        assert _wait(lambda: "c" in agg.online, 10)
        assert "aggregator" not in agg.online and "operator" not in agg.online
        assert agg._eligible() == ["a", "b", "c"]
    finally:
        agg.stop()
        thread.join(timeout=30)
        raw.stop()


def test_an_evaluation_round_past_the_selection_limit_draws_its_sites(tmp_path, mosquitto_url):
    """A round names at most MAX_SELECTED sites: an evaluation round with more eligible draws that many,
    seeded by the run's seed and the round (another round leaves out other sites), not by name order."""
    cfg = ServeConfig(federation="many", state_dir=tmp_path, rounds=1, min_sites=2, deadline_s=60, **TINY)
    agg, raw, thread = _start(cfg, mosquitto_url, ["a", "b"])
    try:
        names = [f"s{i:04d}" for i in range(MAX_SELECTED + 37)]
        with agg.lock:  # (1,037 live sites, as their statuses would leave them)
            for s in names:
                agg.online[s], agg.heard_on[s] = ("online", None), agg.connection
        eligible = agg._eligible()
        first, again, other = agg._evaluators(7), agg._evaluators(7), agg._evaluators(8)
        assert len(first) == MAX_SELECTED == len(set(first)) and set(first) <= set(eligible)
        assert first == again and set(first) != set(other)  # seeded: reproducible, and round by round
        assert set(first) != set(sorted(eligible)[:MAX_SELECTED])  # not the first names
    finally:
        agg.stop()
        thread.join(timeout=30)
        raw.stop()


def test_an_aggregated_update_announced_after_its_round_closed_is_acknowledged_again(tmp_path, mosquitto_url):
    """A site that missed the ack of its accepted update announces it again after the round closed: the
    answer must say accepted (it was aggregated), not "stale round" (which settles it as refused)."""
    cfg = ServeConfig(
        federation="acked", state_dir=tmp_path, rounds=2, min_sites=1, deadline_s=60, final_eval=False, **TINY
    )
    agg, raw, thread = _start(cfg, mosquitto_url, ["a"])
    try:
        round0 = raw.round
        blob = raw.update("a", _deltas(agg, 1))
        assert _wait(lambda: raw.round.round == 1, 30)
        current, raw.round = raw.round, round0
        assert raw.update("a", _deltas(agg, 1)) == blob  # the same update, announced again
        assert _wait(lambda: len([a for a in raw.acks if a["blob_id"] == blob]) == 2, 30)
        assert all(a["accepted"] for a in raw.acks if a["blob_id"] == blob)
        stale = raw.update("a", _deltas(agg, 2))  # another update of round 0: never accepted
        raw.round = current
        assert _wait(lambda: any(a["blob_id"] == stale and not a["accepted"] for a in raw.acks), 30)
    finally:
        agg.stop()
        thread.join(timeout=30)
        raw.stop()
