"""Pictures of search results: each query crop with its top-k gallery crops and their scores, as one PNG
or one self-contained HTML page (images embedded, so it can be mailed or archived as is)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from reid.data.images import open_rgb

CELL = (64, 128)  # width, height of one crop in the PNG
LABEL = 14  # pixels under each crop for its score


def _crop(path: Path) -> Image.Image:
    img = open_rgb(path)
    return (img or Image.new("RGB", CELL, (90, 90, 90))).resize(CELL, Image.BICUBIC)


def render_png(
    queries: Sequence[Path], ranked: Sequence[Sequence[tuple[Path, float]]], out: Path, gap: int = 12
) -> None:
    """One row per query: the query, a gap, then its ranked gallery crops with the cosine under each."""
    columns = 1 + max((len(r) for r in ranked), default=0)
    w, h = CELL
    sheet = Image.new("RGB", (columns * w + gap, len(queries) * (h + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (query, matches) in enumerate(zip(queries, ranked, strict=True)):
        y = row * (h + LABEL)
        sheet.paste(_crop(query), (0, y))
        draw.text((2, y + h), "query", fill="black")
        for col, (path, score) in enumerate(matches, start=1):
            x = col * w + gap
            sheet.paste(_crop(path), (x, y))
            draw.text((x + 2, y + h), f"{col}: {score:.3f}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def _data_uri(path: Path) -> str:
    buf = io.BytesIO()
    _crop(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render_html(
    queries: Sequence[Path], ranked: Sequence[Sequence[tuple[Path, float]]], out: Path, title: str
) -> None:
    rows = []
    for query, matches in zip(queries, ranked, strict=True):
        cells = [f'<td><img src="{_data_uri(query)}"><br><b>{html.escape(query.name)}</b></td>']
        cells += [
            f'<td><img src="{_data_uri(p)}"><br>{rank}. {html.escape(p.name)}<br>{score:.4f}</td>'
            for rank, (p, score) in enumerate(matches, start=1)
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>td{text-align:center;font:12px sans-serif;padding:4px}"
        "td:first-child{border-right:3px solid #444}"
        f"</style><h3>{html.escape(title)}</h3><table>{''.join(rows)}</table>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
