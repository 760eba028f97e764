"""What an operator watches while `cloud-aggregator serve` runs (docs/operations.md, "Watching a
federation"): the Prometheus series of GET /metrics and the federation view of GET /api/v1/federation
that the dashboard page (cloud/dashboard.html) draws, both on `--metrics-port`.

Event series (counters, histograms) are counted as things happen (`AggregatorMetrics`); state series
(round, phase, each site's state, last evaluation, epsilon, served model) are read at scrape time from
the same view the page shows (`ViewCollector`), so the page and Prometheus never disagree. Site labels
come only from sites that announced themselves (their status topic), and rejection reasons are a fixed
set of kinds, so label cardinality stays bounded.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cloud.metrics_log import read_metrics

PHASES = ("starting", "collecting", "aggregating", "evaluating", "waiting", "done")
SITE_STATES = ("online", "training", "uploading", "idle", "failed", "offline")
# why an update was refused (the `reason` label); the full text is in the log, the round summary and the view
REJECT_KINDS = (
    "wrong_site",  # the manifest names another site than its topic's
    "no_round",  # no round open, or a stale round number
    "not_selected",
    "wrong_base",  # computed against another base model
    "conflict",  # another update of this site was already accepted this round
    "bad_manifest",  # an impossible blob reference: larger than the model can produce, bad chunking
    "bad_transfer",  # chunks that do not reassemble into the announced blob
    "bad_payload",  # does not decode: wrong tensors or shapes, not finite
    "evaluation_round",
)
RECENT_REJECTIONS = 20
View = dict[str, Any]


@dataclass
class SiteFacts:
    """What the aggregator has heard of one site (from its status and its messages)."""

    last_seen: float | None = None
    deployed: str | None = None
    epsilon: float | None = None
    last_update_round: int | None = None


class AggregatorMetrics:
    """The aggregator's Prometheus registry: event series here, state series through `ViewCollector`."""

    def __init__(self, view: Callable[[], View]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("fedreid_rounds_completed", "rounds aggregated", registry=r)
        self.accepted = Counter("fedreid_updates_accepted", "updates accepted", ["site"], registry=r)
        self.rejected = Counter(
            "fedreid_updates_rejected", "updates refused, by kind of reason", ["site", "reason"], registry=r
        )
        self.received = Counter(
            "fedreid_received_bytes", "bytes of accepted update blobs", ["site"], registry=r
        )
        self.quorum_misses = Counter(
            "fedreid_quorum_misses", "deadlines passed without quorum (extended or restarted)", registry=r
        )
        self.restarts = Counter("fedreid_round_restarts", "rounds restarted with a new selection", registry=r)
        long = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
        short = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
        self.round_seconds = Histogram(
            "fedreid_round_seconds", "round wall time, open to saved", buckets=long, registry=r
        )
        self.collect_seconds = Histogram(
            "fedreid_collect_seconds", "time from a round's open to its close", buckets=long, registry=r
        )
        self.fold_seconds = Histogram(
            "fedreid_fold_seconds", "aggregation (fold) time per round", buckets=short, registry=r
        )
        self.kd_seconds = Histogram(
            "fedreid_kd_seconds", "server-side distillation time per round", buckets=short, registry=r
        )
        r.register(ViewCollector(view))

    def round_closed(self, summary: dict) -> None:
        self.rounds.inc()
        self.round_seconds.observe(summary["round_seconds"])
        self.collect_seconds.observe(summary["collect_seconds"])
        self.fold_seconds.observe(summary["aggregate_seconds"])
        if "kd" in summary:
            self.kd_seconds.observe(summary["kd"]["seconds"])


class ViewCollector(Collector):
    """State series, from the federation view at scrape time."""

    def __init__(self, view: Callable[[], View]) -> None:
        self.view = view

    def collect(self) -> Iterator[GaugeMetricFamily]:
        v = self.view()
        run = v["run"]
        g = GaugeMetricFamily("fedreid_round", "the round open now, else the last one aggregated")
        g.add_metric([], run["round"] if run["round"] is not None else run["completed"])
        yield g
        g = GaugeMetricFamily("fedreid_rounds_planned", "rounds this run is configured for")
        g.add_metric([], run["rounds"])
        yield g
        g = GaugeMetricFamily("fedreid_round_phase", "1 for the aggregator's current phase", labels=["phase"])
        for phase in PHASES:
            g.add_metric([phase], float(run["phase"] == phase))
        yield g
        g = GaugeMetricFamily("fedreid_round_deadline_timestamp_seconds", "the open round's deadline")
        if run["deadline"] is not None:
            g.add_metric([], run["deadline"])
        yield g
        families = {
            "state": GaugeMetricFamily(
                "fedreid_site_state", "1 for each site's state", labels=["site", "state"]
            ),
            "seen": GaugeMetricFamily(
                "fedreid_site_last_seen_timestamp_seconds", "last message from the site", labels=["site"]
            ),
            "rank1": GaugeMetricFamily(
                "fedreid_site_rank1_ratio",
                "rank-1 of the global model at the site, last evaluation",
                labels=["site"],
            ),
            "mAP": GaugeMetricFamily(
                "fedreid_site_map_ratio",
                "mAP of the global model at the site, last evaluation",
                labels=["site"],
            ),
            "mINP": GaugeMetricFamily(
                "fedreid_site_minp_ratio",
                "mINP of the global model at the site, last evaluation",
                labels=["site"],
            ),
            "epsilon": GaugeMetricFamily(
                "fedreid_site_dp_epsilon",
                "differential-privacy epsilon the site reported spent",
                labels=["site"],
            ),
            "model": GaugeMetricFamily(
                "fedreid_site_model_info", "the model version the site serves", labels=["site", "version"]
            ),
            "last_round": GaugeMetricFamily(
                "fedreid_site_last_update_round", "the last round with an accepted update", labels=["site"]
            ),
        }
        for s in v["sites"]:
            for state in SITE_STATES:
                families["state"].add_metric([s["site"], state], float(s["state"] == state))
            if s["last_seen"] is not None:
                families["seen"].add_metric([s["site"]], s["last_seen"])
            for key in ("rank1", "mAP", "mINP"):
                if s.get(key) is not None:
                    families[key].add_metric([s["site"]], s[key] / 100.0)
            if s["epsilon"] is not None:
                families["epsilon"].add_metric([s["site"]], s["epsilon"])
            if s["deployed"]:
                families["model"].add_metric([s["site"], s["deployed"]], 1.0)
            if s["last_update_round"] is not None:
                families["last_round"].add_metric([s["site"]], s["last_update_round"])
        yield from families.values()


class RunHistory:
    """What the page plots, kept in memory: the global model's metrics per site and round, bytes and
    time per round, and the last rejections. Loaded once from metrics.jsonl (so a restarted aggregator
    shows the whole run) and extended as the aggregator appends to it."""

    def __init__(self, metrics_file: Path) -> None:
        self._metrics: dict[tuple[int, str], dict] = {}  # (round, site) -> {"round", "site", "rank1", ...}
        self.latest: dict[str, dict] = {}  # site -> its evaluation of the newest global model
        self.rounds: list[dict] = []  # {"round", "bytes", "seconds", "accepted", "rejected"}
        self.rejections: deque[dict] = deque(maxlen=RECENT_REJECTIONS)  # {"round", "site", "reason", "time"}
        self._median_norms: dict[int, float] = {}  # round -> lower median of its (normalised) delta norms
        self.add(read_metrics(metrics_file), live=False)

    def add(self, records: list[dict], live: bool = True) -> None:
        for rec in records:
            if rec.get("model") == "global" and "rank1" in rec:
                entry = {k: rec.get(k) for k in ("round", "site", "rank1", "mAP", "mINP")}
                self._metrics[(rec["round"], rec["site"])] = entry  # (a report sent again replaces)
                if rec["round"] >= self.latest.get(rec["site"], {"round": rec["round"]})["round"]:
                    self.latest[rec["site"]] = entry
            elif rec.get("kind") == "round":
                norms = [v for v in (rec.get("norms") or {}).values() if isinstance(v, float) and v > 0]
                if norms and math.isfinite(max(norms)):
                    self._median_norms[rec["round"]] = statistics.median_low(norms)
                self.rounds.append(
                    {
                        "round": rec["round"],
                        "bytes": sum(rec.get("upload_bytes", {}).values()),
                        "seconds": rec.get("round_seconds"),
                        "accepted": len(rec.get("accepted", [])),
                        "rejected": len(rec.get("rejected", [])),
                    }
                )
                if not live:  # (live rejections were noted as they happened)
                    for rej in rec.get("rejected", []):
                        self.rejected(rec["round"], rej.get("site", "?"), rej.get("reason", ""), None)

    def rejected(self, round_: int | None, site: str, reason: str, when: float | None = None) -> None:
        self.rejections.append({"round": round_, "site": site, "reason": reason[:300], "time": when})

    def median_norm(self, round_: int) -> float | None:
        """The lower median of round `round_`'s delta norms as its summary recorded them (None: no such
        round, or no norm): the norm bound's reference for the round after it."""
        return self._median_norms.get(round_)

    @property
    def metrics(self) -> list[dict]:
        """Every evaluation of a global model: {"round", "site", "rank1", "mAP", "mINP"}."""
        return list(self._metrics.values())
