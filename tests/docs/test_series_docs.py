"""The Prometheus series are a contract too: docs/operations.md names every series the aggregator and the
agent expose, and the Grafana dashboard in docs/ queries only series that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cloud.monitoring import AggregatorMetrics
from edge.agent_metrics import AgentMetrics

DOCS = Path(__file__).resolve().parents[2] / "docs"
SITE = {
    "site": "s1",
    "state": "online",
    "last_seen": 1.0,
    "deployed": "f/round-1",
    "epsilon": 1.5,
    "last_update_round": 0,
    "rank1": 50.0,
    "mAP": 40.0,
    "mINP": 20.0,
}
VIEW = {
    "run": {"round": 1, "completed": 0, "rounds": 3, "phase": "collecting", "deadline": 9.0},
    "sites": [SITE],
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "info": ("",)}


def exposed() -> dict[str, set[str]]:
    """Family name -> the sample names it exposes, for the aggregator's and the agent's registries."""
    registries = [AggregatorMetrics(lambda: VIEW).registry, AgentMetrics(lambda: ("v1", "own"), 0).registry]
    out: dict[str, set[str]] = {}
    for registry in registries:
        for family in registry.collect():
            out[family.name] = {family.name + s for s in SUFFIXES[family.type]}
    return out


def test_operations_md_names_every_series():
    text = (DOCS / "operations.md").read_text()
    missing = [name for name in exposed() if f"`{name}" not in text]
    assert not missing, f"docs/operations.md does not describe: {missing}"


def test_the_grafana_dashboard_queries_only_series_that_exist():
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    samples = set().union(*exposed().values())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"fedreid_[a-z0-9_]+", target["expr"])
    }
    assert used and not used - samples, sorted(used - samples)
    assert len(used) >= 25  # (the dashboard shows nearly every series)
