"""Reading `metrics.jsonl` back, whatever happened to it: the one reader that `serve` (resuming, the
dashboard's history), `status`, `report` and `simulate` use.

The file is written by this package (one JSON object per line), but it lives on disks that lose writes
and in folders people edit, and earlier versions let site metrics overwrite record keys. A line that is
not UTF-8, not JSON, nested beyond reason, longer than `MAX_LINE_BYTES`, or a record whose known keys
have the wrong types is left out (counted, and said in one line per file read); non-finite numbers
become null, so every record kept can be served as strict JSON.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

from protocol.messages import NAME

log = logging.getLogger(__name__)
_SITE = re.compile(NAME)

MAX_LINE_BYTES = 8 << 20  # a round summary of thousands of sites is well under a megabyte
# keys of a round or evaluation summary, and the container each must be
_SUMMARY_TYPES: dict[str, type] = {
    "selected": list,
    "accepted": list,
    "rejected": list,
    "failed": dict,
    "weights": dict,
    "norms": dict,
    "upload_bytes": dict,
    "site_timings": dict,
    "dp_epsilon": dict,
    "kd": dict,
}


def strict_json(value: object, depth: int = 0) -> object:
    """`value` with every non-finite float replaced by None (strict JSON, as browsers parse it);
    ValueError when nested deeper than any record of ours."""
    if depth > 16:
        raise ValueError("nested too deep")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v, depth + 1) for v in value]
    return value


def _well_formed(rec: dict) -> bool:
    if "round" in rec and type(rec["round"]) is not int:
        return False
    if "site" in rec:  # a site's scores
        scores = [rec[k] for k in ("rank1", "mAP", "mINP") if k in rec]
        return (
            isinstance(rec["site"], str)
            and _SITE.fullmatch(rec["site"]) is not None  # (a 5 MB name took `report` to 4.4 GB)
            and type(rec.get("round")) is int
            and all(v is None or type(v) in (int, float) for v in scores)
        )
    if not all(isinstance(rec[k], t) for k, t in _SUMMARY_TYPES.items() if k in rec):
        return False
    return all(isinstance(r, dict) for r in rec.get("rejected", []))


def records(path: Path) -> Iterator[tuple[bytes, dict | None]]:
    """(line, record) for every line of `path`; record is None for a line that is left out."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n")
            rec = None
            if line.strip() and len(line) <= MAX_LINE_BYTES:
                try:
                    value = strict_json(json.loads(line.decode("utf-8")))
                    rec = value if isinstance(value, dict) and _well_formed(value) else None
                except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
                    rec = None
            yield line, rec


def read_metrics(path: Path) -> list[dict]:
    """The well-formed records of a metrics.jsonl, in order (see the module's docstring)."""
    kept, left_out = [], 0
    for line, rec in records(path):
        if rec is not None:
            kept.append(rec)
        elif line.strip():
            left_out += 1
    if left_out:
        log.warning("%s: %d damaged or unreadable lines left out", path, left_out)
    return kept
