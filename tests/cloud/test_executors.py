"""The simulator's executors: Ray tasks give bit for bit what the in-process loop gives (and either can
resume the other's run), site failures close the round with the others, and a missing Ray is one line."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from cloud.cli import app
from cloud.executors import INSTALL_HINT, ExecutorConfig, ExecutorUnavailable, make_executor
from cloud.simulate import CHECKPOINT, METRICS, RoundFailed, SimulationConfig, Simulator
from cloud.strategy import KDConfig, StrategyConfig
from reid.data import InputSpec
from reid.model import ModelSpec, build_model
from reid.train import TrainConfig
from tests.conftest import missing

LOCAL = ExecutorConfig(kind="local")
RAY = ExecutorConfig(kind="ray", site_cpus=1)


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """One local Ray instance for the module (each executor then joins it instead of starting one)."""
    try:
        import ray
    except ImportError:
        missing("Ray is not installed (pip install -e '.[cluster]'; `make setup` does it)")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Float results depend on torch's thread count: equal results need equal threads per site (and on
    the driver, which runs KD)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(rounds: int = 2, **kw) -> SimulationConfig:
    defaults = {
        "algorithm": "cdw_kd",
        "model": ModelSpec(arch="resnet18"),
        "input": InputSpec(height=64, width=32),
        "train": TrainConfig(batch_size=16, lr_head=0.02, lr_backbone=0.02),
        "strategy": StrategyConfig(bn="local"),  # BN layers stay with the sites: private state travels
        "kd": KDConfig(batch_size=8, max_batches=2),
        "sites_per_round": 2,
    }
    return SimulationConfig(rounds=rounds, **{**defaults, **kw})


def _sites(federation):
    return sorted((federation / "sites").iterdir())


def _checkpoint(out) -> dict[str, torch.Tensor]:
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _scores(out) -> list[dict]:
    """Everything but wall times and executor figures, in order."""
    drop = {"seconds", "train_seconds", "executor"}
    lines = [json.loads(ln) for ln in (out / METRICS).read_text().splitlines()]
    for r in lines:
        r.get("kd", {}).pop("seconds", None)
    return [{k: v for k, v in r.items() if k not in drop} for r in lines if r.get("kind") != "timing"]


def _assert_same_run(a, b) -> None:
    """Every tensor of the two runs' checkpoints and every metric are equal, the sites' private layers
    (BatchNorm kept local) among them."""
    ca, cb = _checkpoint(a), _checkpoint(b)
    assert ca.keys() == cb.keys()
    assert any(k.startswith("site/") and "/private/" in k for k in ca)
    for key in ca:
        assert torch.equal(ca[key], cb[key]), key
    assert _scores(a) == _scores(b)


def test_ray_gives_the_local_result_bit_for_bit_and_resumes_either_way(
    tiny_federation, tmp_path, ray_instance, one_thread
):
    sites, public = _sites(tiny_federation), tiny_federation / "public"
    Simulator(_config(), sites, tmp_path / "local", public, executor=LOCAL).run()

    ray_run = Simulator(_config(), sites, tmp_path / "ray", public, executor=RAY)
    ray_run.run()
    _assert_same_run(tmp_path / "local", tmp_path / "ray")
    rounds = [json.loads(ln) for ln in (tmp_path / "ray" / METRICS).read_text().splitlines()]
    summaries = [r for r in rounds if r.get("kind") == "round"]
    state_bytes = sum(v.numel() * v.element_size() for v in ray_run.global_state.values())
    for s in summaries:  # the global state went to the object store once per training and eval pass
        assert s["executor"]["puts"] == 2
        assert s["executor"]["put_bytes"] == 2 * state_bytes
        assert len(s["selected"]) == 2 and set(s["weights"]) == set(s["selected"])

    # one round on Ray, the next resumed in-process: still the same run
    mixed = tmp_path / "mixed"
    Simulator(_config(rounds=1), sites, mixed, public, executor=RAY).run()
    resumed = Simulator(_config(), sites, mixed, public, executor=LOCAL)
    assert resumed.try_resume() and resumed.completed == 1
    resumed.run()
    _assert_same_run(tmp_path / "local", mixed)


def test_a_failed_site_leaves_the_round_to_the_others_and_the_quorum_decides(
    tiny_federation, tmp_path, ray_instance
):
    sites = _sites(tiny_federation)
    gone = tmp_path / "site-gone"
    shutil.copytree(sites[0], gone)
    not_a_dataset = tmp_path / "site-empty"
    not_a_dataset.mkdir()
    every = [*sites, gone, not_a_dataset]
    cfg = _config(rounds=1, algorithm="fedpav", sites_per_round=None)
    sim = Simulator(cfg, every, tmp_path / "run", executor=RAY)
    shutil.rmtree(gone)  # the folder vanishes on the node before the round runs
    records = sim.run()
    summary = next(r for r in records if r.get("kind") == "round")
    assert set(summary["failed"]) == {"site-gone", "site-empty"}
    gone_reason = summary["failed"]["site-gone"]
    assert str(gone) in gone_reason and "not found on node" in gone_reason
    assert set(summary["weights"]) == {s.name for s in sites}
    scored = {r["site"] for r in records if r.get("model") == "global"}
    assert scored == {s.name for s in sites}

    strict = cfg.model_copy(update={"quorum": 4})
    with pytest.raises(RoundFailed, match=r"3 of 5 selected sites returned \(quorum 4\).*site-empty"):
        Simulator(strict, every, tmp_path / "strict", executor=LOCAL).run()
    assert not (tmp_path / "strict" / CHECKPOINT).exists()


def test_a_worker_killed_mid_job_fails_its_site_and_the_round_closes_with_the_others(
    tiny_federation, tmp_path, ray_instance
):
    import psutil

    sites = _sites(tiny_federation)
    killed: list[int] = []

    def kill_the_first_running_job() -> None:  # as the OOM killer or a lost node would
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for proc in psutil.process_iter(["cmdline"]):
                if any("ray::_ray_job" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_first_running_job, daemon=True)
    killer.start()
    cfg = _config(rounds=1, algorithm="fedpav", sites_per_round=None)
    no_retry = RAY.model_copy(update={"max_retries": 0})
    records = Simulator(cfg, sites, tmp_path, executor=no_retry).run()
    killer.join()
    assert killed
    summary = next(r for r in records if r.get("kind") == "round")
    [(dead, reason)] = summary["failed"].items()
    assert "WorkerCrashedError" in reason or "died" in reason, reason
    assert set(summary["weights"]) == {s.name for s in sites} - {dead}
    assert {r["site"] for r in records if r.get("model") == "global"} == {s.name for s in sites}


def test_without_ray_the_executor_says_how_to_install_it(tiny_federation, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ExecutorUnavailable, match="pip install"):
        make_executor(RAY, _config(), None, build_model(ModelSpec(arch="resnet18")))
    result = CliRunner().invoke(
        app,
        ["simulate", "--data", str(tiny_federation / "sites"), "--out", str(tmp_path), "--executor", "ray"],
    )
    assert result.exit_code != 0
    assert INSTALL_HINT in " ".join(result.output.split())


def test_a_cluster_address_nobody_answers_is_one_line_not_a_hang(tiny_federation, tmp_path):
    """`--ray-address 127.0.0.1:1` retried for 7.5 minutes and more before this (2026-12-04 new-user
    audit): a HOST:PORT that refuses a connection stops the run with one line."""
    try:
        import ray  # noqa: F401
    except ImportError:
        missing("Ray is not installed (pip install -e '.[cluster]'; `make setup` does it)")
    from protocol.broker import free_port

    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ExecutorUnavailable, match=f"no Ray cluster at {address}"):
        make_executor(
            RAY.model_copy(update={"ray_address": address}),
            _config(),
            None,
            build_model(ModelSpec(arch="resnet18")),
        )
    assert time.monotonic() - started < 30
    result = CliRunner().invoke(
        app,
        ["simulate", "--data", str(tiny_federation / "sites"), "--out", str(tmp_path), "--executor", "ray",
         "--ray-address", address],
    )  # fmt: skip
    assert result.exit_code != 0 and f"no Ray cluster at {address}" in " ".join(result.output.split())
