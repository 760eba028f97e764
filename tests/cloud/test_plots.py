"""The report of a metrics.jsonl: records an earlier version let a site poison are left out."""

from __future__ import annotations

import json

from cloud.metrics_log import read_metrics
from cloud.plots import markdown_report, plot_rounds


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


def test_damaged_lines_are_left_out_wherever_the_file_is_read(tmp_path, caplog):
    """The 2026-12-04 operator audit: one damaged line of metrics.jsonl stopped `serve` from resuming
    (its history is read at start), failed `report` and `status`, or made the dashboard's JSON a 500 for
    the life of the process. Each kind is now one left-out line, said once."""
    from cloud.journal import Journal
    from cloud.metrics_log import strict_json
    from cloud.monitoring import RunHistory

    root = tmp_path / "f"
    root.mkdir()
    good = [
        {"round": 0, "site": "a", "model": "global", "rank1": 50.0, "mAP": 40.0},
        {"round": 0, "kind": "round", "accepted": ["a"], "rejected": [], "upload_bytes": {"a": 10}},
    ]
    damaged = [
        b'{"round": null, "site": "a", "model": "global", "rank1": 1.0, "mAP": 1.0}',
        b'{"round": 1, "kind": "round", "upload_bytes": [1, 2]}',
        b'{"round": 1, "kind": "round", "rejected": ["x"]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"round": 1, "site": "\xff\xfe"}',
        json.dumps({"round": 1, "site": "x" * 100_000, "model": "global"}).encode(),
        b'{"round": 2, "site": "a", "model": "global", "rank1": NaN, "mAP": Infinity}',
    ]
    lines = [json.dumps(good[0]).encode(), *damaged, json.dumps(good[1]).encode()]
    (root / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    records = read_metrics(root / "metrics.jsonl")
    assert records[:1] + records[-1:] == good and len(records) == 3  # (the NaN record, made strict)
    assert records[1] == {"round": 2, "site": "a", "model": "global", "rank1": None, "mAP": None}
    assert "6 damaged or unreadable lines left out" in caplog.text
    history = RunHistory(root / "metrics.jsonl")  # what a restarted `serve` reads for its dashboard
    assert [r["round"] for r in history.rounds] == [0]
    json.dumps(strict_json(history.metrics), allow_nan=False)  # servable
    journal = Journal(root)
    assert journal.has_summary("round", 0) and not journal.has_summary("round", 1)
    assert journal.forget_metrics_after(-1) == 3  # damaged lines are kept as they are, never rewritten
    assert len((root / "metrics.jsonl").read_bytes().splitlines()) == 6  # (the NaN record was readable)


def test_the_dashboard_serves_its_three_things_and_strict_json():
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from cloud.dashboard import create_app

    client = TestClient(
        create_app(lambda: {"sites": [{"rank1": float("nan"), "mAP": 1.0}]}, CollectorRegistry())
    )
    answer = client.get("/api/v1/federation")
    assert answer.status_code == 200 and answer.json() == {"sites": [{"rank1": None, "mAP": 1.0}]}
    assert client.get("/metrics").status_code == 200
    moved = client.get("/metrics/", headers={"host": "evil.example"}, follow_redirects=False)
    assert moved.status_code == 404  # (was a redirect to http://evil.example/metrics)
    assert client.get("/openapi.json").status_code == 404
