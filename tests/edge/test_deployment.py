"""Deployment to sites over a real mosquitto: `cloud-aggregator deploy` publishes, `edge-agent start`
processes verify and swap atomically, hostile manifests never replace a working model, and a site that
connects later learns the deployment from the retained manifest and fetches the file on request."""

from __future__ import annotations

import copy
import errno
import hashlib
import itertools
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion
from safetensors.torch import save_file
from typer.testing import CliRunner

from cloud.cli import app as cloud_app
from cloud.config import ServeConfig
from cloud.journal import Journal
from cloud.local_federation import agent_command
from cloud.strategy import StrategyConfig
from edge.cli import app as edge_app
from edge.client import FeatureClient
from edge.deployment import Deployments, current_model
from export.contract import load_contract
from protocol.broker import parse_url
from protocol.chunks import split_blob
from protocol.messages import BlobRef, Deployment, NodeStatus, encode_message, parse_message
from protocol.mqtt import Endpoint
from protocol.topics import Topics
from reid.adoption import prefer_own
from reid.data import ImageDataset, InputSpec, eval_transform, read_dataset, statistics_loader
from reid.model import ModelSpec, batchnorm_keys, build_model, shared_state
from reid.train import adapt_to_site

FED = "deploytest"


def _wait(predicate, timeout: float = 90.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _retained(url: str, topic_filter: str) -> dict[str, bytes]:
    """The retained messages under `topic_filter`, read by a fresh client."""
    host, port, _ = parse_url(url)
    seen: dict[str, bytes] = {}
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: seen.__setitem__(m.topic, m.payload)
    client.connect(host, port)
    client.subscribe(topic_filter, qos=1)
    client.loop_start()
    time.sleep(1.0)
    client.loop_stop()
    client.disconnect()
    return seen


def _clear_retained(url: str, topic: str) -> None:
    host, port, _ = parse_url(url)
    cleaner = paho.Client(CallbackAPIVersion.VERSION2)
    cleaner.connect(host, port)
    cleaner.loop_start()
    cleaner.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    cleaner.loop_stop()
    cleaner.disconnect()


def _statuses(url: str, topics: Topics) -> dict[str, NodeStatus]:
    """The retained status documents of the federation."""
    return {t.rsplit("/", 1)[1]: parse_message(p) for t, p in _retained(url, topics.status_all).items()}


def _deployed_version(state: Path) -> str | None:
    model = current_model(state)
    return load_contract(model).version if model else None


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """An aggregator state dir with global models for rounds 0 and 1 (different weights), of a federation
    that shares its BatchNorm layers: each site serves the deployed file as it is (bn=local re-exports
    it at the site: test_a_site_that_keeps_its_batchnorm_serves_the_deployment_with_it)."""
    cfg = ServeConfig(
        federation=FED,
        state_dir=tmp_path / "cloud",
        model=ModelSpec(arch="resnet18"),
        input=InputSpec(height=64, width=32),
        strategy=StrategyConfig(bn="average"),
    )
    journal = Journal(tmp_path / "cloud" / FED)
    journal.check_identity(cfg.identity())
    for r in (0, 1):
        torch.manual_seed(r)
        journal.save_global(r, shared_state(build_model(cfg.model, 1)), cfg.model, cfg.input, cfg.strategy.bn)
    return tmp_path / "cloud"


def test_deploy_verify_swap_reject_and_late_join(tiny_federation, tmp_path, mosquitto_url, run_dir):
    topics = Topics(FED)
    sites = sorted((tiny_federation / "sites").iterdir())
    images = sites[0] / "query"
    edge = tmp_path / "edge"
    logs = {s.name: tmp_path / f"{s.name}.log" for s in sites}
    procs = []

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    features = FeatureClient(f"http://127.0.0.1:{port}", timeout=10)
    crop = sorted(images.glob("*.jpg"))[0].read_bytes()

    def served_version() -> str | None:
        try:
            return features.embed([crop]).model.version
        except httpx.TransportError:
            return None

    def start_agent(site: Path, *extra: str) -> None:
        cmd = [*agent_command(site, mosquitto_url, FED, edge)[:-1], *extra]  # without --exit-when-done
        with open(logs[site.name], "ab") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))

    def deploy(round_: int) -> None:
        args = ["deploy", "--state-dir", str(run_dir), "--federation", FED, "--round", str(round_)]
        result = CliRunner().invoke(cloud_app, [*args, "--broker", mosquitto_url, "--images", str(images)])
        assert result.exit_code == 0, result.output
        assert f"deployed {FED}/round-{round_}" in result.output

    try:
        start_agent(sites[1], "--serve-port", str(port))  # with the feature service beside it
        assert _wait(lambda: "site01" in _statuses(mosquitto_url, topics), 60), logs["site01"].read_text()
        deploy(0)
        site01 = edge / "site01"
        assert _wait(lambda: _deployed_version(site01) == f"{FED}/round-0"), logs["site01"].read_text()
        exported = run_dir / FED / "deployments" / "00000" / "model.fp32.onnx"
        assert load_contract(current_model(site01)).sha256 == load_contract(exported).sha256
        assert _wait(lambda: _statuses(mosquitto_url, topics)["site01"].deployed == f"{FED}/round-0", 30)
        assert _wait(lambda: served_version() == f"{FED}/round-0", 60), logs["site01"].read_text()
        added = features.add([crop], camera="c1")
        manifest0 = _retained(mosquitto_url, topics.deploy)[topics.deploy]

        # hostile deployments: contract and blob disagree; a file with a valid hash that is not a model
        evil = Endpoint(mosquitto_url, topics, "evil", "aggregator", announce=False).start()
        contract = load_contract(exported).model_dump(mode="json")
        junk = b"definitely not an onnx model" * 100
        sha = hashlib.sha256(junk).hexdigest()
        ref = BlobRef(blob_id=sha[:32], size=len(junk), sha256=sha, chunks=1, encoding="fp32")
        mismatched = Deployment(
            federation=FED, version="evil/1", round=5, blob=ref, contract=contract, created=0
        )
        evil.publish(topics.deploy, encode_message(mismatched), retain=True).wait_for_publish(5)
        assert _wait(lambda: "contract and blob disagree" in logs["site01"].read_text(), 30)
        # a manifest whose blob claims 10^12 chunks (a retained one came back at every start and the
        # site built a list of every index it missed): refused before anything is kept
        endless = mismatched.model_copy(
            update={
                "version": "evil/0",
                "blob": ref.model_copy(update={"chunks": 10**12}),
                "contract": {**contract, "sha256": sha},
                "created": time.time(),
            }
        )
        evil.publish(topics.deploy, encode_message(endless), retain=True).wait_for_publish(5)
        assert _wait(
            lambda: "dropped deployment evil/0: 1000000000000 chunks" in logs["site01"].read_text(), 30
        )
        broken = mismatched.model_copy(
            update={"version": "evil/2", "contract": {**contract, "sha256": sha}, "created": time.time()}
        )
        evil.publish(topics.deploy, encode_message(broken), retain=True).wait_for_publish(5)
        assert _wait(lambda: "deployment evil/2 announced" in logs["site01"].read_text(), 30)
        for chunk in split_blob(junk, ref.blob_id, 1 << 20):
            evil.publish(topics.deploy_chunks, chunk).wait_for_publish(5)
        evil.publish(topics.deploy, b"{not json", retain=False).wait_for_publish(5)
        assert _wait(lambda: "deployment evil/2 rejected" in logs["site01"].read_text(), 60)
        assert f"still serving {FED}/round-0" in logs["site01"].read_text()
        assert "dropped deployment manifest: not JSON" in logs["site01"].read_text()
        assert _deployed_version(site01) == f"{FED}/round-0"  # the working model was never replaced

        # a real new deployment replaces it (the deployer lingers to answer requests for the file); the
        # previous model stays as the fallback folder
        args = ["deploy", "--state-dir", str(run_dir), "--federation", FED, "--round", "1", "--linger", "300"]
        deployer = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", *args, "--broker", mosquitto_url, "--images", str(images)],
            stdout=open(tmp_path / "deployer.log", "wb"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
        )
        procs.append(deployer)
        assert _wait(lambda: _deployed_version(site01) == f"{FED}/round-1"), logs["site01"].read_text()
        folders = sorted(p.name for p in (site01 / "models").iterdir() if p.is_dir())
        assert (
            len(folders) == 2
            and any("round-0" in f for f in folders)
            and any("round-1" in f for f in folders)
        )

        # replaying round 0's genuine (older) manifest does not roll the site back
        evil.publish(topics.deploy, manifest0, retain=False).wait_for_publish(5)
        assert _wait(
            lambda: f"dropped deployment {FED}/round-0: created before" in logs["site01"].read_text(), 30
        )
        evil.stop()
        assert _deployed_version(site01) == f"{FED}/round-1"
        # the agent's feature service followed the deployment and embedded its gallery again
        assert _wait(lambda: served_version() == f"{FED}/round-1", 60), logs["site01"].read_text()
        gallery = features.gallery()
        assert gallery.entries == 1 and gallery.model.version == f"{FED}/round-1"
        assert features.search(crop=crop, top_k=1).hits[0].id == added[0]

        # a site that connects later gets the retained deployment from the broker alone; this one has the
        # adoption gate on, with round 0's model as its own: it serves whichever scores higher on its
        # validation set, and says which
        gate = tmp_path / "edge02.toml"
        gate.write_text(f'[adoption]\nown_model = "{exported}"\nvalidation = "{sites[0]}"\n')
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_port = s.getsockname()[1]
        start_agent(sites[2], "--config", str(gate), "--metrics-port", str(metrics_port))
        site02 = edge / "site02"
        assert _wait(lambda: (site02 / "models" / "current.json").is_file()), logs["site02"].read_text()
        pointer = json.loads((site02 / "models" / "current.json").read_text())
        assert pointer["version"] == f"{FED}/round-1" and "adoption gate on" in logs["site02"].read_text()
        own = pointer["adopted"] == "own"
        assert own == prefer_own(pointer["validation"]["own"], pointer["validation"]["federation"])
        round1 = run_dir / FED / "deployments" / "00001" / "model.fp32.onnx"
        served = load_contract(current_model(site02)).sha256
        assert served == load_contract(exported if own else round1).sha256
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            series = response.read().decode()
        model = "own" if own else "federation"
        assert f'fedreid_agent_model_info{{model="{model}",version="{FED}/round-1"}} 1.0' in series, series

        # the camera commands use the deployed model through the state folder
        query = sorted((sites[1] / "query").glob("*.jpg"))[0]
        search = ["search", "--model", str(site01), "--gallery", str(sites[1] / "bounding_box_test")]
        result = CliRunner().invoke(edge_app, [*search, "--query", str(query), "--top-k", "2"])
        assert result.exit_code == 0, result.output
        assert query.name in result.output
    finally:
        features.close()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
        _clear_retained(mosquitto_url, topics.deploy)  # nothing left for other tests on the broker
    assert json.loads((site01 / "models" / "current.json").read_text())["precision"] == "fp32"


def test_a_site_that_keeps_its_batchnorm_serves_the_deployment_with_it(
    tiny_federation, tmp_path, mosquitto_url
):
    """bn=local: the deployment keeps its BatchNorm layers separate; a site with its own serves the shared
    weights with them, a site without (it has not trained yet), and a site whose own cannot be read, with
    the deployed ones; every one with the statistics estimated on its own images (AdaBN)."""
    fed = "deploybn"
    topics = Topics(fed)
    sites = sorted((tiny_federation / "sites").iterdir())
    cfg = ServeConfig(
        federation=fed,
        state_dir=tmp_path / "cloud",
        model=ModelSpec(arch="resnet18"),
        input=InputSpec(height=64, width=32),
        strategy=StrategyConfig(bn="local"),
    )
    journal = Journal(tmp_path / "cloud" / fed)
    journal.check_identity(cfg.identity())
    torch.manual_seed(0)
    model = build_model(cfg.model, 1).eval()
    journal.save_global(0, shared_state(model), cfg.model, cfg.input, cfg.strategy.bn)
    paths = [r.path for r in read_dataset(sites[1]).train][:32]
    images = torch.stack([ImageDataset(paths, eval_transform(cfg.input))[i][0] for i in range(len(paths))])
    site = copy.deepcopy(model).train()
    with torch.no_grad():  # the site's own BatchNorm layers: its images' statistics, other affine weights
        site(images)
        for key, value in site.state_dict().items():
            if key.endswith("bn1.bias"):
                value.add_(0.3)
    site.eval()
    state = shared_state(site)
    own_bn = tmp_path / "own.safetensors"
    save_file({k: state[k] for k in batchnorm_keys(state)}, str(own_bn))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    endpoints, deployments = [], {}
    try:
        for name, bn in (("own", own_bn), ("shared", tmp_path / "absent.safetensors"), ("corrupt", corrupt)):
            endpoint = Endpoint(mosquitto_url, topics, name, "site")
            deployments[name] = Deployments(tmp_path / name, endpoint, site_batchnorm=bn, site_data=sites[1])
            endpoints.append(endpoint.start())
        args = ["deploy", "--state-dir", str(tmp_path / "cloud"), "--federation", fed, "--round", "0"]
        result = CliRunner().invoke(
            cloud_app, [*args, "--broker", mosquitto_url, "--images", str(sites[0] / "query")]
        )
        assert result.exit_code == 0, result.output
        assert _wait(lambda: all(d.current() is not None for d in deployments.values()), 180)
        served = {name: d.current() for name, d in deployments.items()}
        assert served["own"].contract.version == f"{fed}/round-0+site-bn"
        stats = f"{fed}/round-0+site-stats"
        assert served["shared"].contract.version == served["corrupt"].contract.version == stats
        train = [r.path for r in read_dataset(sites[1]).train]
        estimated, own = copy.deepcopy(model), copy.deepcopy(model)
        assert adapt_to_site(estimated, None, statistics_loader(train, cfg.input)) > 0
        assert adapt_to_site(
            own, {k: state[k] for k in batchnorm_keys(state)}, statistics_loader(train, cfg.input)
        )
        with torch.no_grad():
            norm = torch.nn.functional.normalize
            want = {
                "own": norm(own.embed(images), dim=1).numpy(),
                "as_kept": norm(site.embed(images), dim=1).numpy(),
                "stats": norm(estimated.embed(images), dim=1).numpy(),
                "global": norm(model.embed(images), dim=1).numpy(),
            }
        got = {name: fx(paths) for name, fx in served.items()}
        assert (got["own"] * want["own"]).sum(axis=1).min() >= 0.9999
        assert (got["shared"] * want["stats"]).sum(axis=1).min() >= 0.9999
        assert (got["corrupt"] * want["stats"]).sum(axis=1).min() >= 0.9999
        assert (got["own"] * got["shared"]).sum(axis=1).mean() < 0.99  # the site's layers made a difference
        assert (got["own"] * want["as_kept"]).sum(axis=1).mean() < 0.999  # its statistics are re-estimated
        assert (want["global"] * got["shared"]).sum(axis=1).mean() < 0.99  # and so did its statistics
    finally:
        for d in deployments.values():
            d.stop()
        for endpoint in endpoints:
            endpoint.stop()
        _clear_retained(mosquitto_url, topics.deploy)


def _manifest(federation: str, blob: bytes, round_: int = 3) -> Deployment:
    from export.contract import Contract
    from protocol.chunks import blob_ref

    contract = Contract(
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), height=64, width=32, output_dim=512, exporter="test",
        opset=18, model=ModelSpec(arch="resnet18"), sha256=hashlib.sha256(blob).hexdigest(),
    )  # fmt: skip
    return Deployment(
        federation=federation, version=f"{federation}/round-{round_}", round=round_,
        blob=blob_ref(blob, 1024), contract=contract.model_dump(mode="json"), created=time.time(),
    )  # fmt: skip


def test_a_deployment_the_sites_disk_could_not_take_is_installed_again(tmp_path, monkeypatch, caplog):
    """A full disk when the run's last deployment came: the install failed, and the site served the older
    model for good (nobody sends the file again after the run; 2026-12-05 chaos audit). The fetched file
    is installed again every INSTALL_RETRY_S, with one line, and the retained manifest meanwhile starts
    no new transfer."""
    from edge import deployment

    monkeypatch.setattr(deployment, "INSTALL_RETRY_S", 0.3)
    topics = Topics("disk")
    deployments = Deployments(tmp_path / "s", Endpoint("mqtt://127.0.0.1:1", topics, "s", "site"))
    tries: list[str] = []

    def install(manifest: Deployment, blob: bytes) -> None:
        tries.append(manifest.version)
        if len(tries) < 3:
            raise OSError(28, "No space left on device")

    deployments._install = install  # type: ignore[method-assign]
    blob = b"m" * 5000
    manifest = _manifest("disk", blob)
    deployments.jobs.put((manifest, blob))
    try:
        assert _wait(lambda: deployments.retry is not None, 10)
        deployments._on_manifest(topics.deploy, encode_message(manifest))  # (at a reconnect)
        assert deployments.pending is None
        deadline = time.monotonic() + 10
        while len(tries) < 3 and time.monotonic() < deadline:
            deployments.poll(5.0)
            time.sleep(0.05)
        deployments.jobs.join()
    finally:
        deployments.jobs.put(None)
    assert tries == ["disk/round-3"] * 3 and deployments.retry is None
    said = [r.getMessage() for r in caplog.records if "could not be installed here" in r.getMessage()]
    assert len(said) == 1 and "No space left on device" in said[0], said


def test_a_full_disk_while_the_sites_batchnorm_goes_in_is_an_install_tried_again(
    tiny_federation, tmp_path, monkeypatch
):
    """Putting this site's BatchNorm layers into a deployment (bn=local) on a full disk: the site served
    the deployed file as it is, with layers no site trained with, until the next deployment (2026-12-05
    chaos audit F7). A full disk is now an install that fails and is tried again (the model it has keeps
    serving); any other reason still serves the deployed file as it is."""
    import export.site_batchnorm as site_bn

    endpoint = Endpoint("mqtt://127.0.0.1:1", Topics("bn"), "s", "site")
    deployments = Deployments(tmp_path / "s", endpoint, site_data=tiny_federation / "sites" / "site01")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"a deployed model")
    monkeypatch.setattr(site_bn, "keeps_batchnorm", lambda path: True)

    def full(*args) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("export failed") from err  # (as an exporter may wrap it)

    monkeypatch.setattr(site_bn, "with_site_batchnorm", full)
    with pytest.raises(OSError, match="no room to put this site's BatchNorm layers in: export failed"):
        deployments._with_site_batchnorm(model)

    def unfit(*args) -> None:
        raise ValueError("no BatchNorm layers named as the contract says")

    monkeypatch.setattr(site_bn, "with_site_batchnorm", unfit)
    assert deployments._with_site_batchnorm(model) == model


def test_a_deployment_nobody_sends_is_asked_for_less_often_and_said_once(tmp_path, mosquitto_url, caplog):
    """A retained deployment outlives the `serve` that made it: a site that joins later asked for it every
    5 s forever, silently (2026-12-04 audit). Unanswered requests now double the wait (to a minute),
    and after the third one line says that nobody may be sending it."""
    topics = Topics("nobody")
    blob = b"m" * 5000
    host, port, _ = parse_url(mosquitto_url)
    asked: list[float] = []
    listener = paho.Client(CallbackAPIVersion.VERSION2)
    listener.on_message = lambda c, u, m: asked.append(time.monotonic())
    listener.connect(host, port)
    listener.subscribe(topics.deploy_resend, qos=1)
    listener.loop_start()
    endpoint = Endpoint(mosquitto_url, topics, "late", "site")
    deployments = Deployments(tmp_path / "late", endpoint)
    endpoint.start()
    try:
        assert endpoint.connected.wait(10)
        manifest = _manifest("nobody", blob)
        # retained, as the aggregator publishes it (and so whenever the site's subscription lands)
        listener.publish(topics.deploy, encode_message(manifest), qos=1, retain=True).wait_for_publish(5)
        assert _wait(lambda: deployments.pending is not None, 10)
        start = time.monotonic()
        while time.monotonic() - start < 3.5:
            deployments.poll(0.2)
            time.sleep(0.02)
    finally:
        endpoint.stop()
        listener.publish(topics.deploy, b"", qos=1, retain=True).wait_for_publish(5)
        listener.loop_stop()
        listener.disconnect()
    # at 0.2, 0.6, 1.4, 3.0 s (waits 0.2, 0.4, 0.8, 1.6): 4 requests, where a fixed wait made 17
    assert 3 <= len(asked) <= 5, asked
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    assert all(later > 1.5 * earlier for earlier, later in itertools.pairwise(gaps)), gaps
    said = [r.getMessage() for r in caplog.records if "nobody may be sending it" in r.getMessage()]
    assert len(said) == 1 and "still serving nothing" in said[0]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"mean": [float("nan"), 0.5, 0.5]}, "mean"),
        ({"scale": float("inf")}, "scale"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"height": "64"}, "height"),
        ({"height": 64.0}, "height"),
        ({"output_dim": 0}, "output_dim"),
        ({"quality": {"min_cosine": float("nan")}}, "quality"),
        ({"sha256": "A" * 64}, "sha256"),
    ],
)
def test_a_deployment_whose_contract_breaks_the_wire_rules_is_dropped(tmp_path, change, says, caplog):
    """The contract escaped the rules every message keeps (2026-12-04 spec audit): a NaN mean, an infinite
    scale, a height as a string were accepted, and the site would have served with them."""
    topics = Topics("bad")
    deployments = Deployments(tmp_path / "s", Endpoint("mqtt://127.0.0.1:1", topics, "s", "site"))
    good = _manifest("bad", b"m" * 5000)
    bad = good.model_copy(update={"contract": {**good.contract, **change}})
    with caplog.at_level(logging.WARNING):
        deployments._on_manifest(topics.deploy, encode_message(bad))
    assert deployments.pending is None
    dropped = [r.getMessage() for r in caplog.records if "dropped deployment manifest" in r.getMessage()]
    assert len(dropped) == 1 and says in dropped[0], dropped
    deployments._on_manifest(topics.deploy, encode_message(good))
    assert deployments.pending is not None  # (the same manifest with its contract intact is taken)
