"""Provisioning + mutual TLS + per-site ACL on a real mosquitto: a site certificate cannot publish as
another site nor read other sites' updates; a client without a certificate and a revoked site are
refused by the broker."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from cryptography import x509
from typer.testing import CliRunner

from cloud.cli import app
from cloud.provision import AGGREGATOR, OPERATOR, Provisioning, mosquitto_conf
from protocol.broker import LocalBroker, find_mosquitto, free_port
from protocol.messages import NodeStatus, encode_message
from protocol.mqtt import Endpoint
from protocol.topics import Topics

FED = "tls"


@pytest.fixture
def provisioned(tmp_path):
    if find_mosquitto() is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("mosquitto is not installed")
        pytest.skip("mosquitto is not installed")
    out = tmp_path / "pki"
    result = CliRunner().invoke(
        app, ["provision", "--federation", FED, "--sites", "site-a,site-b,site-c", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    port = free_port()
    config = mosquitto_conf(out / "broker", port, "127.0.0.1")
    with LocalBroker(port=port, workdir=tmp_path, config=config) as broker:
        yield out, broker


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((topic, payload))

    def topics(self) -> set[str]:
        with self.lock:
            return {t for t, _ in self.messages}


def _node(broker, out, name, handlers=None) -> Endpoint:
    role = "aggregator" if name == AGGREGATOR else "site"
    return Endpoint(broker.url, Topics(FED), name, role, handlers, identity_dir=out / name).start()


def test_provisioned_files_and_keyring(provisioned):
    out, _ = provisioned
    meta = json.loads((out / "federation.json").read_text())
    assert set(meta["identities"]) == {AGGREGATOR, OPERATOR, "site-a", "site-b", "site-c"}
    assert not (out / OPERATOR / "signing.key").exists()  # it reads; it signs nothing
    assert OPERATOR not in json.loads((out / "site-a" / "keys.json").read_text())["identities"]
    cert = x509.load_pem_x509_certificate((out / "site-a" / "client.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=site-a"
    keys = json.loads((out / "site-b" / "keys.json").read_text())["identities"]
    assert keys["site-a"]["role"] == "site" and len(keys[AGGREGATOR]["signing_key"]) == 44
    assert (
        not (out / "site-a" / "ca.key").exists()
        and oct((out / "site-a" / "client.key").stat().st_mode)[-3:] == "600"
    )
    acl = (out / "broker" / "acl").read_text()
    assert "user site-a\ntopic readwrite fedreid/v1/tls/status/site-a" in acl
    assert "topic write fedreid/v1/tls/sites/site-a/update" in acl and "sites/+/" not in acl


def test_tls_acl_confine_each_site_to_its_own_topics(provisioned):
    out, broker = provisioned
    t = Topics(FED)
    cloud_inbox, b_inbox = Inbox(), Inbox()
    cloud = _node(broker, out, AGGREGATOR, {t.any_site("update"): cloud_inbox})
    site_a = _node(broker, out, "site-a")
    # site-b tries to read every site's updates and acks; the ACL lets it read only its own
    site_b = _node(broker, out, "site-b", {t.any_site("update"): b_inbox, t.any_site("ack"): b_inbox})
    for node in (cloud, site_a, site_b):
        assert node.connected.wait(10), "mutual TLS connection failed"
    site_a.publish(t.site("site-a", "update"), b"from a").wait_for_publish(5)
    site_a.publish(t.site("site-b", "update"), b"a pretending to be b").wait_for_publish(5)
    cloud.publish(t.site("site-a", "ack"), b"ack for a").wait_for_publish(5)
    cloud.publish(t.site("site-b", "ack"), b"ack for b").wait_for_publish(5)
    time.sleep(1.5)
    assert cloud_inbox.messages == [(t.site("site-a", "update"), b"from a")]  # the impersonation was dropped
    assert b_inbox.topics() == {t.site("site-b", "ack")}  # no update of site-a, no ack of site-a
    for node in (cloud, site_a, site_b):
        node.stop()


def test_the_operator_watches_a_run_without_taking_over_the_aggregators_session(provisioned):
    from cloud.observer import observe

    out, broker = provisioned
    t = Topics(FED)
    connects = []
    cloud_inbox = Inbox()
    cloud = _node(broker, out, AGGREGATOR, {t.round: cloud_inbox})
    cloud.on_connected = lambda: connects.append(time.monotonic())
    site_a = _node(broker, out, "site-a")
    assert cloud.connected.wait(10) and site_a.connected.wait(10)
    cloud.publish(t.round, b"", retain=True).wait_for_publish(5)
    site_b = _node(broker, out, "site-b")  # an insider: on its own status topic, it speaks for others
    assert site_b.connected.wait(10)
    time.sleep(0.5)
    before = len(connects)
    # `cloud-aggregator status --identity-dir <pki>/operator`: signed status documents, verified
    watched: dict = {}
    watch = threading.Thread(target=lambda: watched.update(observe(broker.url, FED, out / OPERATOR, 3.0)))
    watch.start()
    time.sleep(1.5)  # (connected and subscribed)
    for node, role, state in ((AGGREGATOR, "aggregator", "idle"), ("ghost", "site", "training")):
        spoof = NodeStatus(node=node, role=role, state=state, time=time.time())
        site_b.publish(t.status("site-b"), encode_message(spoof)).wait_for_publish(5)
    failed = NodeStatus(node="site-b", role="site", state="failed", round=7, reason="[red]x\x1b[31m", time=0)
    site_b.publish(t.status("site-b"), encode_message(failed)).wait_for_publish(5)
    watch.join(timeout=10)
    seen = watched
    assert seen[AGGREGATOR][:2] == ("aggregator", "online") and seen["site-a"][:2] == ("site", "online")
    assert "ghost" not in seen  # a node speaks for itself only
    assert seen["site-b"][1] == "failed (round 7: [red]x\\x1b[31m)"  # escaped: no terminal control
    operator = Endpoint(
        broker.url, Topics(FED), OPERATOR, "observer", announce=False, identity_dir=out / OPERATOR
    )
    assert operator.start().connected.wait(10)
    operator.publish(t.round, b"from the operator").wait_for_publish(5)  # the ACL: it reads only
    time.sleep(1.5)
    assert cloud.connected.is_set() and len(connects) == before  # the aggregator was never knocked off
    assert all(payload != b"from the operator" for _, payload in cloud_inbox.messages)
    for node in (operator, cloud, site_a, site_b):
        node.stop()


def test_no_certificate_and_revoked_site_are_refused(provisioned, tmp_path):
    out, broker = provisioned
    anonymous = Endpoint(broker.url.replace("mqtts", "mqtt"), Topics(FED), "anon", "site", announce=False)
    anonymous.start(timeout=2)
    assert not anonymous.connected.is_set()  # plain MQTT on the TLS listener: no session
    anonymous.stop()
    site_c_files = tmp_path / "site-c-copy"
    site_c_files.mkdir()
    for name in ("ca.crt", "client.crt", "client.key"):
        (site_c_files / name).write_bytes((out / "site-c" / name).read_bytes())
    result = CliRunner().invoke(app, ["provision", "revoke-site", "--out", str(out), "--site", "site-c"])
    assert result.exit_code == 0, result.output
    assert "user site-c" not in (out / "broker" / "acl").read_text()
    broker.reload()
    time.sleep(0.5)
    revoked = Endpoint(broker.url, Topics(FED), "site-c", "site", identity_dir=site_c_files).start(timeout=3)
    assert not revoked.connected.is_set()  # its certificate is on the CRL
    revoked.stop()
    added = CliRunner().invoke(app, ["provision", "add-site", "--out", str(out), "--site", "site-d"])
    assert added.exit_code == 0, added.output
    broker.reload()
    time.sleep(0.5)
    site_d = _node(broker, out, "site-d")
    assert site_d.connected.wait(10) and "site-d" in Provisioning(out).sites
    site_d.stop()


def test_a_round_over_mutual_tls_with_signing(provisioned, tiny_federation, tmp_path, caplog):
    import subprocess

    from cloud.config import ServeConfig
    from cloud.local_federation import agent_command
    from cloud.server import Aggregator
    from reid.data import InputSpec
    from reid.model import ModelSpec

    out, broker = provisioned
    sites = sorted((tiny_federation / "sites").iterdir())[1:]  # site01, site02
    prov = Provisioning(out)
    for site in sites:  # identities named like the data set folders
        prov.add_site(site.name)
    broker.reload()
    time.sleep(0.5)
    cfg = ServeConfig(
        federation=FED,
        state_dir=tmp_path / "cloud",
        identity_dir=out / AGGREGATOR,
        rounds=1,
        min_sites=2,
        deadline_s=300,
        model=ModelSpec(arch="resnet18"),
        input=InputSpec(height=64, width=32),
        batch_size=16,
        lr_head=0.02,
        lr_backbone=0.02,
    )
    # site01's TLS credentials without its signing key: the broker lets it in, the aggregator must not
    unsigned = tmp_path / "site01-tls-only"
    unsigned.mkdir()
    for name in ("ca.crt", "client.crt", "client.key"):
        (unsigned / name).write_bytes((out / sites[0].name / name).read_bytes())
    aggregator = Aggregator(cfg, broker.url)
    sent: list[bool] = []

    def forge() -> None:
        aggregator.endpoint.connected.wait(30)
        rogue = Endpoint(
            broker.url, Topics(FED), sites[0].name, "site", announce=False, identity_dir=unsigned
        )
        rogue.start()
        info = rogue.publish(
            Topics(FED).site(sites[0].name, "update"), b'{"schema_version": 1, "kind": "update"}'
        )
        info.wait_for_publish(10)
        sent.append(info.is_published())
        rogue.stop()

    procs = []
    forger = threading.Thread(target=forge)
    try:
        for site in sites:
            identity = ["--identity-dir", str(out / site.name)]
            cmd = [*agent_command(site, broker.url, FED, tmp_path / "edge"), *identity]
            log = open(tmp_path / f"{site.name}.log", "wb")  # noqa: SIM115 (closed with the process)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        forger.start()
        aggregator.run()
        forger.join()
        assert sent == [True]
        for proc in procs:
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    records = [
        json.loads(line) for line in (tmp_path / "cloud" / FED / "metrics.jsonl").read_text().splitlines()
    ]
    rounds = [r for r in records if r.get("kind") == "round"]
    assert rounds[0]["accepted"] == [s.name for s in sites]
    assert (
        f"dropped message on fedreid/v1/{FED}/sites/{sites[0].name}/update: unsigned message" in caplog.text
    )


def test_serve_with_broker_auto_starts_the_provisioned_tls_broker(provisioned, tmp_path):
    import signal
    import subprocess
    import sys

    out, _ = provisioned
    cmd = [sys.executable, "-m", "cloud.cli", "serve", "--federation", FED, "--broker", "auto"]
    cmd += [
        "--identity-dir",
        str(out / AGGREGATOR),
        "--state-dir",
        str(tmp_path / "state"),
        "--arch",
        "resnet18",
    ]
    log = tmp_path / "serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "connected to 127.0.0.1" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert "mutual TLS + ACL from" in text and "broker: mqtts://127.0.0.1:" in text, text
        assert "connected to 127.0.0.1" in text  # the aggregator got in with its certificate
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_revocation_takes_effect_in_the_aggregator_without_a_restart(provisioned, tmp_path):
    """A selected site is revoked mid-round: the running aggregator drops it from that round at once (no
    wait for the deadline) and never selects it again; the other sites' signed updates are aggregated."""
    import numpy as np

    from cloud.config import ServeConfig
    from cloud.server import Aggregator
    from protocol.chunks import blob_ref
    from protocol.codec import encode_state
    from protocol.messages import RoundStart, UpdateManifest, encode_message, parse_message
    from tests.cloud.test_federation import TINY, _wait

    out, broker = provisioned
    topics = Topics(FED)
    cfg = ServeConfig(
        federation=FED,
        state_dir=tmp_path / "cloud",
        identity_dir=out / AGGREGATOR,
        final_eval=False,  # the nodes are hand-driven and do not evaluate
        rounds=2,
        min_sites=2,
        deadline_s=600,
        **TINY,
    )
    rounds: list[RoundStart] = []

    def on_round(topic: str, payload: bytes) -> None:
        if not payload:  # the aggregator clearing the topic as it starts
            return
        message = parse_message(payload)
        if isinstance(message, RoundStart):
            rounds.append(message)

    sites = {name: _node(broker, out, name) for name in ("site-a", "site-b", "site-c")}
    sites["site-a"].handlers[topics.round] = on_round
    sites["site-a"].client.subscribe(topics.round, qos=1)
    aggregator = Aggregator(cfg, broker.url)
    thread = threading.Thread(target=aggregator.run, daemon=True)
    thread.start()

    def upload(name: str, r: int) -> None:
        start = rounds[-1]
        rng = np.random.default_rng(r)
        delta = {
            k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32)
            if v.dtype.is_floating_point
            else np.zeros(v.shape, np.int64)
            for k, v in aggregator.global_state.items()
        }
        blob = encode_state(delta, "fp16")
        ref = blob_ref(blob, 65536, "fp16")
        manifest = UpdateManifest(
            site=name, round=r, base_hash=start.base_hash, blob=ref, n_samples=10, cdw=0.5, loss=1.0,
            train_seconds=1.0,
        )  # fmt: skip
        node = sites[name]
        node.publish(topics.site(name, "update"), encode_message(manifest)).wait_for_publish(10)
        node.publish_blob(topics.site(name, "chunks"), blob, ref.blob_id, 65536)

    try:
        assert _wait(lambda: rounds and rounds[-1].round == 0, timeout=60)
        assert rounds[-1].selected == ["site-a", "site-b", "site-c"]
        upload("site-a", 0)
        result = CliRunner().invoke(app, ["provision", "revoke-site", "--out", str(out), "--site", "site-c"])
        assert result.exit_code == 0, result.output
        upload("site-b", 0)
        assert _wait(lambda: aggregator.completed == 0, timeout=60)  # not the 600 s deadline
        assert _wait(lambda: rounds[-1].round == 1, timeout=30)
        assert rounds[-1].selected == ["site-a", "site-b"]
        upload("site-a", 1)
        upload("site-b", 1)
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        aggregator.stop()
        for node in sites.values():
            node.stop()
    summaries = [
        r
        for r in map(json.loads, (tmp_path / "cloud" / FED / "metrics.jsonl").read_text().splitlines())
        if r.get("kind") == "round"
    ]
    assert summaries[0]["accepted"] == ["site-a", "site-b"]
    assert summaries[0]["failed"] == {"site-c": "identity revoked"}
    assert summaries[1]["selected"] == ["site-a", "site-b"]


def test_the_provisioned_broker_refuses_a_message_larger_than_any_chunk(provisioned):
    """A site flooding 17 MiB messages took mosquitto from 12 MB to 3.4 GB (2026-12-04 audit): the
    provisioned broker now drops the connection of a client sending more than the largest chunk our
    nodes send (16 MiB + framing); a chunk of the largest size goes through."""
    from protocol.chunks import MAX_CHUNK_BYTES

    out, broker = provisioned
    t = Topics(FED)
    cloud_inbox = Inbox()
    cloud = _node(broker, out, AGGREGATOR, {t.any_site("chunks"): cloud_inbox})
    site_a = _node(broker, out, "site-a")
    assert cloud.connected.wait(10) and site_a.connected.wait(10)
    reconnects = []
    site_a.on_connected = lambda: reconnects.append(time.monotonic())
    site_a.publish(t.site("site-a", "chunks"), b"x" * (MAX_CHUNK_BYTES + 200_000))
    deadline = time.monotonic() + 20
    while not reconnects and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reconnects, "the broker kept the connection of a client sending an oversized message"
    site_a.stop()  # (its MQTT client would send the message again at every reconnect)
    site_b = _node(broker, out, "site-b")
    assert site_b.connected.wait(10)
    site_b.publish(t.site("site-b", "chunks"), b"y" * MAX_CHUNK_BYTES).wait_for_publish(10)
    deadline = time.monotonic() + 10
    while not cloud_inbox.messages and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [(topic, len(p)) for topic, p in cloud_inbox.messages] == [
        (t.site("site-b", "chunks"), MAX_CHUNK_BYTES)
    ]
    for node in (cloud, site_b):
        node.stop()


def test_one_deeply_nested_message_does_not_deafen_a_signing_node(provisioned, caplog):
    """300 KB of '[' on a site's own topic (within the ACL, no key needed) raised RecursionError in the
    envelope check, outside every handler's guard: the aggregator's message thread died and it heard
    nothing more (2026-12-05). It is one dropped message now, and the next one is handled."""
    out, broker = provisioned
    t = Topics(FED)
    inbox = Inbox()
    cloud = _node(broker, out, AGGREGATOR, {t.any_site("update"): inbox})
    site_a = _node(broker, out, "site-a")
    try:
        assert cloud.connected.wait(10) and site_a.connected.wait(10)
        for nested in (b"[" * 300_000, b'{"kind": "signed", "signer": ' + b"[" * 100_000):
            site_a.client.publish(t.site("site-a", "update"), nested, qos=1).wait_for_publish(5)
        site_a.publish(t.site("site-a", "update"), b"after").wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not inbox.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert inbox.messages == [(t.site("site-a", "update"), b"after")]
        assert "not a signed message (not JSON" in caplog.text
    finally:
        cloud.stop()
        site_a.stop()


@pytest.mark.parametrize("name", [AGGREGATOR, OPERATOR])
def test_no_site_may_take_a_reserved_node_name(name, tmp_path, tiny_federation):
    """`aggregator` and `operator` are nodes of their own: a site of either name shared their status
    topic (on a broker without ACLs the aggregator's own status was taken for a site's)."""
    from edge.agent import AgentConfig

    with pytest.raises(ValueError, match="reserved node names"):
        Provisioning.create(tmp_path / "pki", FED, ["site-a", name])
    assert not (tmp_path / "pki").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="reserved node names"):
        AgentConfig(site=name, data=tiny_federation / "sites" / "site00", state_dir=tmp_path)
    result = CliRunner().invoke(
        app, ["provision", "--federation", FED, "--sites", name, "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "reserved node names" in result.output
