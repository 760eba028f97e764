"""The agent's Prometheus series (`edge-agent start --metrics-port`, loopback by default; off unless asked):
what the site is doing, how its local training goes, what it sent, the last round it took part in and
the model it serves. docs/operations.md lists them. The feature service, when it runs inside the agent
(`--serve-port`), has its own /metrics on its own port (docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PHASES = ("waiting", "fetching", "training", "uploading", "evaluating", "failed")


class _ServedModel(Collector):
    def __init__(self, served: Callable[[], tuple[str | None, str]]) -> None:
        self.served = served

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "fedreid_agent_model_info",
            "the deployment serving inference; model: federation, or own (the adoption gate kept the "
            "site's own model)",
            labels=["version", "model"],
        )
        version, model = self.served()
        if version:
            g.add_metric([version, model], 1.0)
        yield g


class MetricsPortError(RuntimeError):
    """The metrics port cannot be served (taken, or not allowed); the text names it."""


class AgentMetrics:
    def __init__(self, served: Callable[[], tuple[str | None, str]], last_round: int) -> None:
        self.registry = r = CollectorRegistry()
        self._phase = Gauge("fedreid_agent_phase", "1 for what the agent is doing", ["phase"], registry=r)
        self.progress = Gauge(
            "fedreid_agent_training_progress_ratio",
            "batches done of the local training in progress",
            registry=r,
        )
        self.images_per_s = Gauge(
            "fedreid_agent_train_images_per_second", "local training throughput of the last round", registry=r
        )
        self.upload_bytes = Counter(
            "fedreid_agent_upload_bytes", "update bytes published, first sends and resends", registry=r
        )
        self.resent_chunks = Counter(
            "fedreid_agent_upload_resent_chunks",
            "update chunks sent again on the aggregator's request",
            registry=r,
        )
        self.rounds = Counter(
            "fedreid_agent_rounds", "rounds trained and uploaded by this process", registry=r
        )
        self.last_round = Gauge("fedreid_agent_last_round", "the last round this site trained", registry=r)
        self.last_round.set(last_round)
        r.register(_ServedModel(served))
        self.phase("waiting")
        self._server = None

    def phase(self, name: str) -> None:
        for p in PHASES:
            self._phase.labels(p).set(float(p == name))

    def serve(self, host: str, port: int) -> int:
        """Answer GET /metrics on host:port from a thread; the port bound (MetricsPortError if it cannot)."""
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise MetricsPortError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from None
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
