"""The report of a metrics.jsonl: records an earlier version let a site poison are left out."""

from __future__ import annotations

import json

from cloud.plots import markdown_report, plot_rounds, read_metrics


def test_a_report_leaves_out_records_whose_keys_a_site_overwrote(tmp_path):
    """Before 2026-12-04 a site's metrics named round/site/model overwrote its record's keys; `report`
    then failed sorting a float site among strings, on every later run (the file is append-only)."""
    path = tmp_path / "metrics.jsonl"
    good = [
        {"round": r, "site": s, "model": "global", "rank1": 50.0 + r, "mAP": 40.0}
        for r in (0, 1)
        for s in "ab"
    ]
    poisoned = {"round": 1e15, "site": 0.0, "model": 1.0, "rank1": 1e30, "mAP": 1.0}
    lines = [json.dumps(x) for x in [good[0], poisoned, good[1], {"round": 0, "kind": "round"}, *good[2:]]]
    path.write_text("\n".join([*lines, "not json", "[1, 2]"]) + "\n")
    records = read_metrics(path)
    assert poisoned not in records and len(records) == 5
    table = markdown_report(records)
    assert "| 1 | 51.0 / 40.0 | 51.0 / 40.0 | 51.0 |" in table and "1e+30" not in table
    assert plot_rounds(records, tmp_path / "rounds.png", "t").read_bytes()[:4] == b"\x89PNG"


def test_the_round_table_shows_failures_and_restarts():
    rounds = [
        {"round": 0, "kind": "round", "accepted": ["a", "b"], "rejected": [], "failed": {}, "restarts": 0},
        {
            "round": 1,
            "kind": "round",
            "accepted": ["a"],
            "rejected": [{"site": "c", "reason": "wrong base hash"}],
            "failed": {"b": "DatasetLayoutError: missing split folder"},
            "restarts": 1,
            "collect_seconds": 12.5,
        },
    ]
    table = markdown_report(rounds)
    assert "| 0 | 2 | - | - | 0 | - |" in table
    failed = "b (DatasetLayoutError: missing split folder)"
    assert f"| 1 | 1 | c (wrong base hash) | {failed} | 1 | 12.5 |" in table
