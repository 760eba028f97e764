"""Hostile input on every topic an edge agent reads (real mosquitto, the real `edge-agent start`
process): each gets one clear log line, the agent keeps running and then completes a real round."""

from __future__ import annotations

import json
import subprocess
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cloud.config import ServeConfig
from cloud.local_federation import agent_command
from cloud.server import Aggregator
from protocol.broker import parse_url
from protocol.chunks import split_blob
from protocol.messages import BlobRef, ModelInfo, RoundStart, RunEnd, TrainingInfo, UpdateAck, encode_message
from protocol.topics import Topics
from reid.data import InputSpec
from reid.model import ModelSpec

FED = "hostile-edge"


def test_agent_survives_hostile_input_then_trains_a_round(tiny_federation, tmp_path, mosquitto_url):
    site = sorted((tiny_federation / "sites").iterdir())[2]
    t = Topics(FED)
    log_path = tmp_path / "agent.log"
    host, port, _ = parse_url(mosquitto_url)
    evil = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"evil-{time.time_ns()}")
    evil.connect(host, port)
    evil.loop_start()
    # an earlier run's RunEnd, retained: this agent (exit_when_done) left at once, before the next run's
    # aggregator started and cleared it, and that run waited for it (2026-12-05 audit)
    earlier = RunEnd(federation=FED, rounds=3, run_id="ab" * 16)
    evil.publish(t.round, encode_message(earlier), qos=1, retain=True).wait_for_publish(10)
    with open(log_path, "wb") as out:
        agent = subprocess.Popen(
            agent_command(site, mosquitto_url, FED, tmp_path / "edge"), stdout=out, stderr=subprocess.STDOUT
        )

    def send(topic: str, payload: bytes) -> None:
        evil.publish(topic, payload, qos=1).wait_for_publish(10)

    def text() -> str:
        return log_path.read_text()

    try:
        deadline = time.monotonic() + 60
        while "up:" not in text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "up:" in text(), text()
        while "a run this site was not part of ended" not in text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "a run this site was not part of ended" in text() and agent.poll() is None, text()
        ref = BlobRef(blob_id="ee" * 16, size=10, sha256="e" * 64, chunks=1)  # (base_hash: its sha256)
        other_fed = RoundStart(
            federation="elsewhere",
            round=0,
            base_hash="e" * 64,
            blob=ref,
            model=ModelInfo(arch="resnet18"),
            training=TrainingInfo(),
            deadline=time.time() + 60,
            selected=[site.name],
        )
        endless = other_fed.model_copy(  # this federation's round, its model in 10^12 chunks
            update={"federation": FED, "blob": ref.model_copy(update={"size": 10**6, "chunks": 10**12})}
        )
        hostile = [
            (t.round, encode_message(endless)),
            (t.round, b"\x00\xff not json"),
            (t.round, b'{"schema_version": 2, "kind": "round_start"}'),
            (t.round, encode_message(other_fed)),  # another federation's round: ignored
            (t.round, encode_message(RunEnd(federation="elsewhere", rounds=1))),  # must not stop this agent
            (t.global_chunks, b"FRC1 garbage header"),
            (t.global_chunks, next(split_blob(b"x" * 100, "ab" * 16))),  # a chunk nobody announced
            (t.site(site.name, "ack"), b'{"kind": "ack"}'),
            (t.site(site.name, "ack"), b"[]"),
            (t.site(site.name, "resend"), b'{"schema_version": 1, "kind": "resend", "blob_id": "zz"}'),
            (t.deploy, b'{"schema_version": 1, "kind": "deployment", "version": "x"}'),
            (t.deploy_chunks, b"\x00" * 64),
        ]
        logged = {
            0: "dropped round 0 announcement: 1000000000000 chunks for 1000000 bytes",
            1: "dropped round message: not JSON",
            2: "dropped round message: unsupported schema_version",
        }
        for i, (topic, payload) in enumerate(hostile):
            send(topic, payload)
            # a newer message on the round topic supersedes one still waiting (the inbox keeps the
            # newest state message): let the agent see each before the next
            deadline = time.monotonic() + 10
            while i in logged and logged[i] not in text() and time.monotonic() < deadline:
                time.sleep(0.05)
        fake_ack = UpdateAck(site=site.name, round=0, blob_id="ab" * 16, accepted=False, reason="forged")
        send(t.site(site.name, "ack"), encode_message(fake_ack))
        deadline = time.monotonic() + 30
        while "dropped deployment chunk" not in text() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = text()
        for expected in (
            "[site=site02 round=-] edge.agent: dropped round message: not JSON",
            "dropped round 0 announcement: 1000000000000 chunks for 1000000 bytes",
            "dropped round message: unsupported schema_version 2",
            "dropped global-model chunk: bad chunk header length",
            "dropped ack: unsupported schema_version None",
            "dropped ack: not a JSON object",
            "dropped resend request: invalid resend",
            "dropped deployment manifest: invalid deployment",
            "dropped deployment chunk: not a chunk message",
        ):
            assert expected in log, expected
        assert agent.poll() is None  # still running, RunEnd of another federation ignored

        cfg = ServeConfig(
            federation=FED,
            state_dir=tmp_path / "cloud",
            rounds=1,
            min_sites=1,
            deadline_s=120,
            model=ModelSpec(arch="resnet18"),
            input=InputSpec(height=64, width=32),
            batch_size=16,
            lr_head=0.02,
            lr_backbone=0.02,
        )
        Aggregator(cfg, mosquitto_url).run()
        assert agent.wait(timeout=60) == 0
    finally:
        evil.loop_stop()
        evil.disconnect()
        if agent.poll() is None:
            agent.kill()
    records = [
        json.loads(line) for line in (tmp_path / "cloud" / FED / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["accepted"] for r in records if r.get("kind") == "round"] == [[site.name]]
