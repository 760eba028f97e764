"""Conformance: the aggregator against a site written from docs/protocol.md alone. The sending side
uses paho, json, hashlib, struct, safetensors and zstandard only (no project code for the wire
format), so a disagreement between the spec and the code fails here. Each test names the spec rule it pins."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import zstandard
from paho.mqtt.enums import CallbackAPIVersion
from safetensors.numpy import load, save

from cloud.config import ServeConfig
from cloud.server import Aggregator
from cloud.strategy.clustering import ClusterConfig
from tests.cloud.test_federation import TINY, _wait

FED = "conformance"
ROOT = f"fedreid/v1/{FED}"
CHUNK = 65536


def frame(blob_id: str, index: int, blob: bytes, chunk: int = CHUNK) -> bytes:
    """docs/protocol.md, Chunks: b"FRC1" | uint32 BE header length | header JSON | data."""
    data = blob[index * chunk : (index + 1) * chunk]
    header = {
        "blob_id": blob_id,
        "index": index,
        "count": max(1, -(-len(blob) // chunk)),
        "chunk_size": chunk,
        "blob_size": len(blob),
        "blob_sha256": hashlib.sha256(blob).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    head = json.dumps(header).encode()
    return b"FRC1" + struct.pack(">I", len(head)) + head + data


class SpecSite:
    """A site as a third party would write it from the spec."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.round: dict | None = None
        self.global_chunks: dict[str, dict[int, bytes]] = {}  # blob id -> index -> data
        self.acks: list[dict] = []
        self.requests: list[tuple[str, dict]] = []
        self.sites: set[str] = set()  # put online by this client
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"spec-{time.time_ns()}")
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        for topic in (
            f"{ROOT}/round",
            f"{ROOT}/global/chunks",
            f"{ROOT}/sites/+/ack",
            f"{ROOT}/sites/+/resend",
        ):
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if not msg.payload:  # "a zero-length payload is a retained message being cleared: ignore it"
            return
        if msg.topic.endswith("/round"):
            doc = json.loads(msg.payload)
            if doc["kind"] == "round_start":
                self.round = doc
        elif msg.topic.endswith("/global/chunks"):
            (length,) = struct.unpack(">I", msg.payload[4:8])
            header = json.loads(msg.payload[8 : 8 + length])
            self.global_chunks.setdefault(header["blob_id"], {})[header["index"]] = msg.payload[8 + length :]
        elif msg.topic.endswith("/ack"):
            self.acks.append(json.loads(msg.payload))
        else:
            self.requests.append((msg.topic.split("/")[-2], json.loads(msg.payload)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(f"{ROOT}/{topic}", payload, qos=1, retain=retain).wait_for_publish(10)

    def publish_chunks(
        self, site: str, blob_id: str, delta: bytes, indices: range, chunk: int = CHUNK
    ) -> None:
        sent = [
            self.client.publish(f"{ROOT}/sites/{site}/chunks", frame(blob_id, i, delta, chunk), qos=1)
            for i in indices
        ]
        for info in sent:
            info.wait_for_publish(30)

    def online(self, site: str, state: str = "online") -> None:
        doc = {"schema_version": 1, "kind": "status", "node": site, "role": "site", "state": state}
        self.publish(f"status/{site}", json.dumps({**doc, "round": None, "time": time.time()}).encode(), True)
        self.sites.add(site)

    def model_blob(self, ref: dict, base_hash: str) -> bytes:
        """A model announced by the round (its own or a group's), from its chunks, checked against the
        base hash that names it."""
        assert _wait(lambda: len(self.global_chunks.get(ref["blob_id"], {})) == ref["chunks"])
        chunks = self.global_chunks[ref["blob_id"]]
        blob = b"".join(chunks[i] for i in range(ref["chunks"]))
        assert hashlib.sha256(blob).hexdigest() == ref["sha256"] == base_hash
        return blob

    def global_blob(self) -> bytes:
        """The announced round's global model."""
        assert self.round is not None
        return self.model_blob(self.round["blob"], self.round["base_hash"])

    def delta(self, value: float = 0.001, blob: bytes | None = None) -> tuple[bytes, str]:
        """A small fp16 delta of every tensor of `blob` (default: the round's global model)."""
        blob = self.global_blob() if blob is None else blob
        tensors = {
            k: (np.full(v.shape, value, np.float16) if v.dtype.kind == "f" else np.zeros(v.shape, v.dtype))
            for k, v in load(blob).items()
        }
        delta = save(tensors, metadata={"format": "fedreid-blob/1;encoding=fp16"})
        return delta, hashlib.sha256(delta).hexdigest()[:32]

    def manifest(self, site: str, delta: bytes, blob_id: str, chunk: int = CHUNK, **fields) -> bytes:
        assert self.round is not None
        blob = {
            "blob_id": blob_id,
            "size": len(delta),
            "sha256": hashlib.sha256(delta).hexdigest(),
            "chunks": max(1, -(-len(delta) // chunk)),
            "encoding": "fp16",
            "compressed": False,
        }
        doc = {
            "schema_version": 1,
            "kind": "update",
            "site": site,
            "round": self.round["round"],
            "base_hash": self.round["base_hash"],
            "blob": blob,
            "n_samples": 10,
            "cdw": 0.5,
            "loss": 1.0,
            "train_seconds": 1.0,
            **fields,
        }
        return json.dumps(doc).encode()

    def stop(self) -> None:
        """Leave as a site does: its retained status says offline (the broker outlives this test, and a
        later aggregator must not count these sites as online)."""
        for site in sorted(self.sites):
            self.online(site, "offline")
        self.client.loop_stop()
        self.client.disconnect()


def _start(
    tmp_path, url: str, sites: tuple[str, ...] = ("a", "b"), **settings
) -> tuple[Aggregator, SpecSite, threading.Thread]:
    """An aggregator (one round unless `settings` say otherwise) with these spec sites online, once round 0
    is announced."""
    defaults = {"rounds": 1, "min_sites": len(sites), "deadline_s": 120, "transfer_idle_s": 0.5}
    cfg = ServeConfig(federation=FED, state_dir=tmp_path, **{**defaults, **settings}, **TINY)
    agg = Aggregator(cfg, url)
    site = SpecSite(url)
    for name in sites:
        site.online(name)
    thread = threading.Thread(target=agg.run, daemon=True)
    thread.start()
    assert _wait(lambda: site.round is not None)
    return agg, site, thread


def test_a_site_written_from_the_spec_takes_part_in_a_round(tmp_path, mosquitto_url):
    agg, site, thread = _start(tmp_path, mosquitto_url)
    try:
        assert site.round["selected"] == ["a", "b"]
        delta, blob_id = site.delta()
        count = -(-len(delta) // CHUNK)
        # "Every rejection naming a round is an UpdateAck" on the sender's topic, also for a manifest that
        # names another site than its topic; the round summary lists it. A site whose update is rejected is
        # out of the round, but "may still send a different update ... judged afresh" while it is open.
        site.publish("sites/b/update", site.manifest("a", delta, blob_id))
        assert _wait(lambda: any(a["site"] == "b" and not a["accepted"] for a in site.acks), timeout=30)
        site.publish("sites/b/update", site.manifest("b", delta, blob_id))
        site.publish_chunks("b", blob_id, delta, range(count))
        assert _wait(lambda: any(a["site"] == "b" and a["accepted"] for a in site.acks), timeout=30)
        # "A site answers requests for its pending update ... It may publish its manifest again first:
        # a manifest with the same blob_id ... keeps the chunks already received."
        site.publish("sites/a/update", site.manifest("a", delta, blob_id))
        site.publish_chunks("a", blob_id, delta, range(count - 1))
        assert _wait(lambda: any(s == "a" for s, _ in site.requests), timeout=30)
        first = next(r for s, r in site.requests if s == "a")
        assert first["indices"] == [count - 1] and first["blob_id"] == blob_id
        site.publish("sites/a/update", site.manifest("a", delta, blob_id))  # the same manifest again
        site.publish_chunks("a", blob_id, delta, range(count - 1, count))  # then only what was asked
        assert _wait(lambda: any(a["site"] == "a" and a["accepted"] for a in site.acks), timeout=30)
        assert all(r["indices"] == [count - 1] for s, r in site.requests if s == "a")  # never the rest again

        # "after the last round ... RoundStart R (train: false) + the final model's blob"
        assert _wait(lambda: site.round["round"] == 1, timeout=60)
        assert site.round["train"] is False and site.round["evaluate"]
        assert site.round["selected"] == ["a", "b"]
        base = site.round["base_hash"]
        assert load(site.global_blob()).keys() == load(delta).keys()
        # "The evaluation round's manifests are rejected"
        site.publish("sites/a/update", site.manifest("a", delta, blob_id))
        assert _wait(lambda: any(a["round"] == 1 and not a["accepted"] for a in site.acks), timeout=30)
        # "reports for ... another base hash ... are dropped": the aggregator still waits for a's report
        site.publish("sites/a/eval", report("a", 1, "0" * 64, {"rank1": 99.0}))
        site.publish("sites/a/eval", report("a", 1, base, {"rank1": 50.0, "mAP": 40.0, "valid_queries": 4}))
        site.publish("sites/b/eval", report("b", 1, base, {}))  # "{}: this site does not evaluate"
        thread.join(timeout=60)
        assert not thread.is_alive()  # every selected site reported: RunEnd without waiting for the deadline
    finally:
        agg.stop()
        site.stop()
    records = [json.loads(line) for line in (tmp_path / FED / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in records if r.get("kind") == "round")
    assert summary["accepted"] == ["a", "b"]
    assert [r["site"] for r in summary["rejected"]] == ["b"] and "topic" in summary["rejected"][0]["reason"]
    # "record them (round R-1, model "global")"
    final = [r for r in records if r.get("model") == "global"]
    scores = {"rank1": 50.0, "mAP": 40.0, "valid_queries": 4}
    assert final == [{"round": 0, "site": "a", "model": "global", **scores}]
    evaluation = next(r for r in records if r.get("kind") == "evaluation")
    assert evaluation["reported"] == ["a", "b"] and evaluation["missing"] == []


def test_the_same_blob_cut_again_with_another_chunk_size_is_collected(tmp_path, mosquitto_url):
    """Chunks: "a receiver holding chunks of one chunk_size that gets a chunk of another (the sender
    restarted with another chunk size) starts the transfer again with the new one (the newest cut wins)".
    The restarted sender announces the new cut (same blob_id, another `chunks`): that manifest was
    ignored, as "the same blob_id", and the upload could never finish (2026-12-05 audit)."""
    agg, site, thread = _start(tmp_path, mosquitto_url, sites=("a",), final_eval=False)
    try:
        delta, blob_id = site.delta()
        site.publish("sites/a/update", site.manifest("a", delta, blob_id))
        site.publish_chunks("a", blob_id, delta, range(2))  # two chunks of the first cut, then a restart
        half = CHUNK // 2
        assert len(delta) > 4 * CHUNK  # (the two cuts differ in their count)
        site.publish("sites/a/update", site.manifest("a", delta, blob_id, chunk=half))
        site.publish_chunks("a", blob_id, delta, range(-(-len(delta) // half)), chunk=half)
        assert _wait(lambda: any(a["site"] == "a" and a["accepted"] for a in site.acks), timeout=30)
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        agg.stop()
        site.stop()


def test_a_site_in_a_group_trains_from_its_groups_model(tmp_path, mosquitto_url):
    cluster = ClusterConfig(groups=2, after=1, sketch_size=4096)
    agg, site, thread = _start(tmp_path, mosquitto_url, ("a", "b", "c"), rounds=3, cluster=cluster)
    sign = {"a": 1.0, "b": 1.0, "c": -1.0}  # c's updates point the other way: a group of its own

    def bases() -> dict[str, tuple[bytes, str]]:
        """Each site's model and base hash this round: its group's when listed, else the round's."""
        group_of = {name: g for g in site.round.get("groups", []) for name in g["sites"]}
        out = {}
        for name in sign:
            g = group_of.get(name)
            ref, base = (g["blob"], g["base_hash"]) if g else (site.round["blob"], site.round["base_hash"])
            out[name] = (site.model_blob(ref, base), base)
        return out

    def train(round_: int) -> None:
        for name, (blob, base) in bases().items():
            delta, blob_id = site.delta(0.001 * sign[name], blob)
            site.publish(f"sites/{name}/update", site.manifest(name, delta, blob_id, base_hash=base))
            site.publish_chunks(name, blob_id, delta, range(-(-len(delta) // CHUNK)))
        assert _wait(
            lambda: {a["site"] for a in site.acks if a["round"] == round_ and a["accepted"]} == set(sign), 60
        )
        assert _wait(lambda: site.round["round"] == round_ + 1, timeout=60)

    try:
        assert "groups" not in site.round  # "sent only when not empty": one global model before `after`
        train(0)
        for round_ in (1, 2):
            groups = site.round["groups"]
            group_of = {name: g for g in groups for name in g["sites"]}
            # "a site is in at most one group, and only selected sites are listed"
            assert sum(len(g["sites"]) for g in groups) == len(group_of) == 3
            assert set(group_of) == set(site.round["selected"]) == set(sign)
            assert group_of["a"]["group"] == group_of["b"]["group"] != group_of["c"]["group"]
            # "Groups with the same model share one blob (the same blob_id)"
            assert len({g["blob"]["blob_id"] for g in groups}) == len({g["base_hash"] for g in groups})
            if round_ == 2:  # the groups' models have moved apart
                blobs = bases()
                assert blobs["a"] == blobs["b"] != blobs["c"]
                assert blobs["a"][1] != site.round["base_hash"] != blobs["c"][1]
                # "an update naming the round's own base hash is rejected ("wrong base hash")"
                delta, blob_id = site.delta(0.001, blobs["a"][0])
                site.publish("sites/a/update", site.manifest("a", delta, blob_id))
                assert _wait(lambda: any(a["round"] == 2 and not a["accepted"] for a in site.acks), 30)
                assert "base hash" in next(a for a in site.acks if a["round"] == 2)["reason"]
            train(round_)
        # "Evaluation rounds (train: false) carry no groups: every site evaluates the global model."
        assert site.round["train"] is False and "groups" not in site.round
        site.global_blob()
        for name in sign:
            site.publish(f"sites/{name}/eval", report(name, 3, site.round["base_hash"], {}))
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        agg.stop()
        site.stop()


def report(site: str, round_: int, base_hash: str, metrics: dict) -> bytes:
    """docs/protocol.md, EvalReport."""
    doc = {"schema_version": 1, "kind": "eval", "site": site, "round": round_, "base_hash": base_hash}
    return json.dumps({**doc, "metrics": metrics}).encode()


def int8_blob(tensors: dict[str, np.ndarray], compress: bool) -> bytes:
    """docs/protocol.md, Blobs, the int8 encoder: s = max|x| / 127 (1 for an all-zero tensor),
    q = clip(round(x / s), -127, 127) as `<name>` (I8) + `<name>::scale` (F32, [1])."""
    out: dict[str, np.ndarray] = {}
    for name, x in tensors.items():
        if x.dtype.kind != "f":
            out[name] = x
            continue
        peak = float(np.abs(x).max()) if x.size else 0.0
        s = np.float32(peak / 127 if peak > 0 else 1.0)
        out[name] = np.clip(np.rint(x / s), -127, 127).astype(np.int8)
        out[name + "::scale"] = np.array([s], np.float32)
    payload = save(out, metadata={"format": "fedreid-blob/1;encoding=int8"})
    return zstandard.ZstdCompressor().compress(payload) if compress else payload


def test_the_specs_encodings_and_rejections(tmp_path, mosquitto_url):
    agg, site, thread = _start(tmp_path, mosquitto_url, final_eval=False)
    try:
        base = load(site.global_blob())
        conv = next(k for k in base if k.endswith("conv1.weight"))
        zero = next(k for k in base if k.endswith("linear.bias"))

        def rejected(topic_site: str, doc: bytes, words: str) -> None:
            before = len(site.acks)
            site.publish(f"sites/{topic_site}/update", doc)
            assert _wait(lambda: len(site.acks) > before, timeout=30)
            ack = site.acks[-1]
            assert ack["site"] == topic_site and not ack["accepted"] and words in ack["reason"], ack

        fp16, fp16_id = site.delta()  # 0.001 everywhere
        rejected("a", site.manifest("a", fp16, fp16_id, round=7), "future round")
        rejected("a", site.manifest("a", fp16, fp16_id, base_hash="0" * 64), "base hash")
        rejected("c", site.manifest("c", fp16, fp16_id), "not selected")
        too_many = json.loads(site.manifest("a", fp16, fp16_id))
        too_many["blob"]["chunks"] = len(fp16) // 1024 + 2
        rejected("a", json.dumps(too_many).encode(), "chunks")

        # "The aggregator answers requests for the current global blob ... only from sites selected"
        ref = site.round["blob"]
        site.global_chunks.clear()
        ask = {"schema_version": 1, "kind": "resend", "blob_id": ref["blob_id"], "indices": [0]}
        site.publish("global/resend", json.dumps({**ask, "requester": "c"}).encode())
        time.sleep(2.0)
        assert not site.global_chunks
        site.publish("global/resend", json.dumps({**ask, "requester": "a"}).encode())
        assert _wait(lambda: list(site.global_chunks.get(ref["blob_id"], {})) == [0], timeout=30)

        # "Receivers reject ... NaN/Inf" (the site is told, and may send another update)
        poisoned = {k: v.copy() for k, v in load(fp16).items()}
        poisoned[conv][0, 0, 0, 0] = np.nan
        bad = save(poisoned, metadata={"format": "fedreid-blob/1;encoding=fp16"})
        bad_id = hashlib.sha256(bad).hexdigest()[:32]
        site.publish("sites/b/update", site.manifest("b", bad, bad_id))
        site.publish_chunks("b", bad_id, bad, range(-(-len(bad) // CHUNK)))
        assert _wait(lambda: any(a["blob_id"] == bad_id and "NaN" in a["reason"] for a in site.acks), 30)

        # a: int8 + zstd, built by the spec's encoder rule; b: the fp16 delta
        rng = np.random.default_rng(0)
        tensors = {
            k: rng.uniform(-0.002, 0.002, v.shape).astype(np.float32)
            if v.dtype.kind == "f"
            else np.zeros_like(v)
            for k, v in base.items()
        }
        tensors[zero][:] = 0.0
        packed = int8_blob(tensors, compress=True)
        assert packed[:4] == b"\x28\xb5\x2f\xfd"
        packed_id = hashlib.sha256(packed).hexdigest()[:32]
        doc = json.loads(site.manifest("a", packed, packed_id))
        doc["blob"].update(encoding="int8", compressed=True)
        site.publish("sites/a/update", json.dumps(doc).encode())
        site.publish_chunks("a", packed_id, packed, range(-(-len(packed) // CHUNK)))
        site.publish("sites/b/update", site.manifest("b", fp16, fp16_id))
        site.publish_chunks("b", fp16_id, fp16, range(-(-len(fp16) // CHUNK)))
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        agg.stop()
        site.stop()
    decoded = load(zstandard.ZstdDecompressor().decompress(packed))
    a_conv = decoded[conv].astype(np.float32) * decoded[conv + "::scale"][0]  # "value = q * s"
    assert decoded[zero + "::scale"][0] == 1.0 and not decoded[zero].any()
    new = load((tmp_path / FED / "rounds" / "00000" / "global.safetensors").read_bytes())
    step = np.float32(np.float16(0.001))
    # equal claims (images and CDW distance), similar norms: the plain mean of the two deltas
    np.testing.assert_allclose(new[conv], base[conv] + (a_conv + step) / 2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(new[zero], base[zero] + step / 2, rtol=0, atol=1e-6)
