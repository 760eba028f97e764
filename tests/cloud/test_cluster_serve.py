"""Client clustering in the networked federation (real mosquitto, agent processes): after the grouping
round every selected site trains from its group's model, named in the RoundStart, the global model is
the size-weighted average of the group models, and a restarted aggregator keeps the groups."""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cloud.config import ServeConfig
from cloud.local_federation import agent_command
from cloud.server import Aggregator
from cloud.strategy.clustering import ClusterConfig
from protocol.messages import GroupBase, RoundStart, encode_message, parse_message
from protocol.topics import Topics
from tests.cloud.test_federation import TINY, Recorder


def _groups_file(root, r):
    with safe_open(str(root / f"{r:05d}" / "groups.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_sites_train_from_their_group_model_and_a_restart_keeps_the_groups(
    tiny_federation, tmp_path, mosquitto_url
):
    sites = sorted((tiny_federation / "sites").iterdir())
    names = [s.name for s in sites]
    cfg = ServeConfig(
        federation="groups",
        state_dir=tmp_path / "cloud",
        rounds=3,
        min_sites=3,
        deadline_s=600,
        final_eval=False,
        cluster=ClusterConfig(groups=2, after=1, sketch_size=4096),
        **TINY,
    )
    recorder = Recorder(mosquitto_url, Topics("groups").round)
    agents = [
        subprocess.Popen(
            agent_command(s, mosquitto_url, "groups", tmp_path / "edge", "cpu"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for s in sites
    ]
    try:
        first = Aggregator(cfg, mosquitto_url)
        thread = threading.Thread(target=first.run)
        thread.start()
        deadline = time.monotonic() + 300
        while first.completed < 1 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.1)
        first.stop()  # stopped in round 2, which the next aggregator takes up with the groups restored
        thread.join(timeout=60)
        assert first.completed >= 1 and not thread.is_alive()
        Aggregator(cfg, mosquitto_url).run()
        for agent in agents:
            agent.wait(timeout=120)
    finally:
        for agent in agents:
            agent.kill()
        recorder.stop()
    metrics = cfg.state_dir / "groups" / "metrics.jsonl"

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rounds = {r["round"]: r for r in records if r.get("kind") == "round"}
    assert sorted(rounds) == [0, 1, 2]
    assert all(r["accepted"] == names and not r["rejected"] for r in rounds.values())
    groups = rounds[0]["groups"]  # formed after the grouping round, kept across the restart
    assert set(groups) == set(names) and set(groups.values()) <= {0, 1}
    assert rounds[1]["groups"] == groups and rounds[2]["groups"] == groups

    starts = {}
    for _, payload in recorder.messages:
        if not payload:  # the restarted aggregator clearing the round topic as it starts
            continue
        msg = parse_message(payload)
        if isinstance(msg, RoundStart) and msg.train:
            starts[msg.round] = msg
    assert starts[0].groups == []  # one global model in the grouping round
    root = tmp_path / "cloud" / "groups" / "rounds"
    for r in (1, 2):
        listed = {site: g.group for g in starts[r].groups for site in g.sites}
        assert listed == groups  # every selected site is told its group's model
        tensors, _ = _groups_file(root, r - 1)
        for g in starts[r].groups:  # ... and the model is the group model checkpointed after r-1
            mine = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"group/{g.group}/")}
            assert set(mine) == set(load_file(str(root / f"{r - 1:05d}" / "global.safetensors")))
            assert starts[r].for_site(g.sites[0]).base_hash == g.base_hash != ""

    # the global model is the average of the group models weighted by their sites' training images, a
    # size nobody vouched for counting as at most the lower median of all (as fednova's path claims)
    tensors, meta = _groups_file(root, 2)
    samples, placed = json.loads(meta["group_samples"]), json.loads(meta["groups"])
    median = statistics.median_low(samples.values())
    size = {g: sum(min(n, median) for s, n in samples.items() if placed[s] == g) for g in {*placed.values()}}
    assert len(set(samples.values())) > 1  # (the sites' sizes differ: the bound is tested)
    total = sum(size.values())
    final = load_file(str(root / "00002" / "global.safetensors"))
    for key, value in final.items():
        if not value.dtype.is_floating_point:
            continue
        expected = sum(size[g] * tensors[f"group/{g}/{key}"].double() for g in size) / total
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    # each site's score of the model it trained from is recorded as its group model's
    scored = {(r["round"], r["site"]): r["model"] for r in records if r.get("model")}
    assert {scored[(0, s)] for s in names} == {"group"} and {scored[(-1, s)] for s in names} == {"global"}


def test_the_round_document_names_each_sites_model_and_stays_readable_without_groups():
    ref = {"blob_id": "ab" * 8, "size": 10, "sha256": "1" * 64, "chunks": 1}
    base = {
        "federation": "f", "round": 3, "base_hash": "1" * 64, "blob": ref, "deadline": 1.0,
        "model": {"arch": "resnet18"}, "training": {}, "selected": ["a", "b", "c"],
    }  # fmt: skip
    plain = RoundStart(**base)
    assert b"groups" not in encode_message(plain)  # readers that predate clustering keep working
    group = GroupBase(
        group=1, base_hash="2" * 64, blob={**ref, "blob_id": "cd" * 8, "sha256": "2" * 64}, sites=["b"]
    )
    start = RoundStart(**base, groups=[group])
    again = parse_message(encode_message(start))
    assert again == start
    assert start.for_site("b").base_hash == "2" * 64 and start.for_site("b").blob.blob_id == "cd" * 8
    assert start.for_site("a") == start and start.for_site("b").groups == []
    with pytest.raises(ValueError, match="two groups"):
        RoundStart(**base, groups=[group, group.model_copy(update={"group": 0})])
    with pytest.raises(ValueError, match="not selected"):
        RoundStart(**base, groups=[group.model_copy(update={"sites": ["z"]})])
    # a base hash that is not its blob's: no site could ever get that model (it waited the round out)
    with pytest.raises(ValueError, match=r"base_hash is not blob\.sha256"):
        RoundStart(**{**base, "base_hash": "3" * 64})
    with pytest.raises(ValueError, match=r"base_hash is not blob\.sha256"):
        GroupBase(group=1, base_hash="2" * 64, blob=ref, sites=["b"])
