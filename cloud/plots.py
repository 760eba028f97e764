"""Plots and tables of per-round metrics (from a metrics.jsonl written by the simulator or aggregator)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def site_curves(records: list[dict], model: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{metric: {site: [(round, value), ...]}} for rank-1 and mAP of the given model kind."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {
        "rank1": defaultdict(list),
        "mAP": defaultdict(list),
    }
    for rec in records:
        if rec.get("model") == model and "rank1" in rec:  # (a site without valid queries has no score)
            for metric in curves:
                curves[metric][rec["site"]].append((rec["round"] + 1, rec[metric]))
    return curves


def plot_rounds(records: list[dict], out: Path, title: str) -> Path:
    """rank-1 and mAP per site per round, for the global model (the sites' own models for `local`)."""
    model = "global" if any(r.get("model") == "global" for r in records) else "local"
    curves = site_curves(records, model)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, per_site) in zip(axes, curves.items(), strict=True):
        for site, points in sorted(per_site.items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=site)
        ax.set_xlabel("rounds completed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric}, {model} model")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown_report(records: list[dict]) -> str:
    """Per-round table of every site's rank-1 / mAP (global model) plus the round timings."""
    evals = [r for r in records if r.get("model") in ("global", "local") and "rank1" in r]
    sites = sorted({r["site"] for r in evals})
    by_round: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in evals:
        by_round[r["round"]][r["site"]] = r
    lines = [
        "| round | " + " | ".join(f"{s} rank-1 / mAP" for s in sites) + " | mean rank-1 |",
        "| --- | " + " | ".join("---" for _ in sites) + " | --- |",
    ]
    for rnd in sorted(by_round):
        row = by_round[rnd]
        cells = [f"{row[s]['rank1']:.1f} / {row[s]['mAP']:.1f}" if s in row else "-" for s in sites]
        mean = sum(v["rank1"] for v in row.values()) / len(row)
        lines.append(f"| {rnd} | " + " | ".join(cells) + f" | {mean:.1f} |")
    rounds = [r for r in records if r.get("kind") == "round"]
    if rounds:
        lines += [
            "",
            "| round | accepted | rejected | failed | restarts | collect s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in rounds:
            rejected = ", ".join(f"{x['site']} ({x['reason']})" for x in r.get("rejected", [])) or "-"
            failed = ", ".join(f"{site} ({why})" for site, why in sorted(r.get("failed", {}).items())) or "-"
            lines.append(
                f"| {r['round']} | {len(r.get('accepted', r.get('weights', {})))} | {rejected} | {failed} | "
                f"{r.get('restarts', 0)} | {r.get('collect_seconds', '-')} |"
            )
    return "\n".join(lines) + "\n"
