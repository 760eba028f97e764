"""Where the simulator's site jobs run: ``local`` (one after the other in this process) or ``ray`` (Ray
tasks on a local instance or a cluster, as Flower's simulation engine runs its virtual clients).

Both yield each job's `SiteResult` in job order as soon as it and every earlier one are done, so the
simulator folds updates in site order whatever finishes first: the same seed gives the same global state
with either executor (bit for bit when each site trains with the same number of torch threads). The
``ray`` executor puts each model the jobs start from (the global one; one per group under client
clustering) into the object store once per pass, whatever the number of sites, keeps at most
`in_flight` jobs running or finished-but-not-yet-folded (the driver never holds all K updates), and
turns a worker that died, ran out of memory or lost its node into that site's failure (after Ray's own
retries of system failures; a retried job recomputes the same result).

Ray serialises task arguments and results with pickle between the processes of *your* cluster: run it
only on nodes you control, never exposed to the sites (the federation's wire, `protocol/`, never
unpickles anything).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cloud.site_round import SiteJob, SiteResult, SiteWorker, State
from reid.model import ReIDModel

log = logging.getLogger(__name__)

INSTALL_HINT = "the ray executor needs Ray: pip install 'fedreid-edge[cluster]' (or pip install 'ray>=2.40')"


class ExecutorConfig(BaseModel):
    """How the simulator runs its sites. Not part of a run's identity: it does not change the results."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(
        None, description="None: start a local Ray instance; 'auto' or HOST:PORT: join a running cluster"
    )
    site_cpus: float = Field(1.0, gt=0, description="CPUs reserved per site job (ray)")
    site_gpus: float = Field(0.0, ge=0, description="GPUs per site job; 0.25 = four sites per GPU (ray)")
    threads: int | None = Field(
        None, ge=1, description="torch threads per site (default: local all cores, ray max(1, site_cpus))"
    )
    in_flight: int | None = Field(
        None, ge=1, description="site jobs running or waiting to be folded (default: 2 x the site slots)"
    )
    max_retries: int = Field(1, ge=0, description="Ray's retries of a job whose worker died (ray)")


class ExecutorUnavailable(RuntimeError):
    """The executor cannot run here (Ray not installed, no cluster at the address, the cluster cannot fit
    one site job)."""


def _check_reachable(address: str) -> None:
    """Ray retries a cluster address that does not answer for many minutes (a run that looks hung): a
    HOST:PORT (or ray://HOST:PORT) that refuses a TCP connection for 10 s is one line instead."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError) as err:
        raise ExecutorUnavailable(f"no Ray cluster at {address} ({err})") from None


class LocalExecutor:
    """Every site job in this process, one after the other."""

    kind = "local"

    def __init__(self, config: ExecutorConfig, sim_config, public_dir: str | None, model: ReIDModel) -> None:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.worker = SiteWorker(sim_config, public_dir, model)

    def take_stats(self) -> dict[str, int]:
        return {}

    def train(self, jobs: Sequence[SiteJob], bases: Mapping[str, State]) -> Iterator[SiteResult]:
        return (self.worker.train(job, bases[job.base]) for job in jobs)

    def evaluate(self, jobs: Sequence[SiteJob], bases: Mapping[str, State]) -> Iterator[SiteResult]:
        return (self.worker.evaluate(job, bases[job.base]) for job in jobs)

    def close(self) -> None:
        pass


_WORKERS: dict[str, SiteWorker] = {}  # per Ray worker process: one per simulation config


def _ray_job(sim_config, public_dir: str | None, threads: int, kind: str, job: SiteJob, arrays) -> SiteResult:
    """A site job inside a Ray worker (the state arrives as read-only arrays from the object store)."""
    from reid.logs import configure_logging

    key = sim_config.model_dump_json() + str(public_dir)
    worker = _WORKERS.get(key)
    if worker is None:
        configure_logging()
        _WORKERS.clear()  # a worker process serves one simulation at a time
        worker = _WORKERS[key] = SiteWorker(sim_config, public_dir)
    torch.set_num_threads(threads)
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    return worker.train(job, state) if kind == "train" else worker.evaluate(job, state)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailable(INSTALL_HINT) from None
    return ray


class RayExecutor:
    """Site jobs as Ray tasks with `site_cpus`/`site_gpus` each, streamed back in job order."""

    kind = "ray"

    def __init__(self, config: ExecutorConfig, sim_config, public_dir: str | None) -> None:
        ray = self.ray = _import_ray()
        if config.ray_address is not None:
            _check_reachable(config.ray_address)
        self.owns = not ray.is_initialized()
        if self.owns:
            try:
                ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True)
            except ConnectionError as err:  # (`auto` with no cluster running on this node)
                said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ExecutorUnavailable(
                    f"cannot join a Ray cluster at {config.ray_address}: {said}"
                ) from None
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        if config.site_cpus > cpus or config.site_gpus > gpus:
            self.close()
            raise ExecutorUnavailable(
                f"one site job needs {config.site_cpus} CPUs and {config.site_gpus} GPUs; "
                f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs"
            )
        slots = int(cpus // config.site_cpus)
        if config.site_gpus > 0:
            slots = min(slots, int(gpus // config.site_gpus))
        self.slots = max(1, slots)
        self.window = config.in_flight or 2 * self.slots
        self.threads = config.threads or max(1, int(config.site_cpus))
        self.args = (sim_config, public_dir, self.threads)
        self.task = ray.remote(_ray_job).options(
            num_cpus=config.site_cpus, num_gpus=config.site_gpus, max_retries=config.max_retries
        )
        self.stats = self._zero()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        log.info(
            "ray: %d node(s), %g CPUs, %g GPUs: %d site jobs at once, %d torch thread(s) each",
            nodes,
            cpus,
            gpus,
            self.slots,
            self.threads,
        )

    @staticmethod
    def _zero() -> dict[str, int]:
        return {"puts": 0, "put_bytes": 0, "result_bytes": 0}

    def take_stats(self) -> dict[str, int]:
        """Object-store traffic since the last call: puts of the global state, their bytes, result bytes."""
        stats, self.stats = self.stats, self._zero()
        return stats

    def train(self, jobs: Sequence[SiteJob], bases: Mapping[str, State]) -> Iterator[SiteResult]:
        return self._stream("train", jobs, bases)

    def evaluate(self, jobs: Sequence[SiteJob], bases: Mapping[str, State]) -> Iterator[SiteResult]:
        return self._stream("evaluate", jobs, bases)

    def _stream(self, kind: str, jobs: Sequence[SiteJob], bases: Mapping[str, State]) -> Iterator[SiteResult]:
        if not jobs:
            return
        ray = self.ray
        refs = {}
        for name in sorted({job.base for job in jobs}):  # each base once per pass, whatever the sites
            arrays = {k: v.detach().cpu().numpy() for k, v in bases[name].items()}
            refs[name] = ray.put(arrays)
            self.stats["puts"] += 1
            self.stats["put_bytes"] += sum(a.nbytes for a in arrays.values())
        running: dict[object, int] = {}
        done: dict[int, SiteResult] = {}
        submitted = next_ = 0
        while next_ < len(jobs):
            while submitted < len(jobs) and len(running) + len(done) < self.window:
                job = jobs[submitted]
                running[self.task.remote(*self.args, kind, job, refs[job.base])] = submitted
                submitted += 1
            if next_ not in done:
                ready, _ = ray.wait(list(running), num_returns=1)
                for r in ready:
                    i = running.pop(r)
                    done[i] = self._result(r, jobs[i])
                continue
            result = done.pop(next_)
            self.stats["result_bytes"] += result.nbytes
            next_ += 1
            yield result

    def _result(self, ref, job: SiteJob) -> SiteResult:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as err:  # the worker died, ran out of memory, lost its node
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
            log.warning("site %s: its Ray job failed: %s", job.name, reason)
            return SiteResult(job.name, "?", error=reason)

    def close(self) -> None:
        if self.owns and self.ray.is_initialized():
            self.ray.shutdown()


def make_executor(
    config: ExecutorConfig, sim_config, public_dir: str | None, model: ReIDModel
) -> LocalExecutor | RayExecutor:
    if config.kind == "ray":
        return RayExecutor(config, sim_config, public_dir)
    return LocalExecutor(config, sim_config, public_dir, model)
