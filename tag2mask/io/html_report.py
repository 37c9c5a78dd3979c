"""Static HTML report pages (demo, ``eval --html``): notes, summary table, bar chart, legend, image grid.

One self-contained page per run: plain HTML and CSS with an inline SVG chart, no JavaScript and no
external files besides the run's own PNGs, linked relatively so the folder can be moved or served.

Layout, top to bottom: title; notes (warnings first, e.g. the toy-model note); key/value summary;
a table (one row per method or class); a horizontal bar chart of one number per row; a colour
legend; the image grid (one row per image, one column per view: input, ground truth, predictions).
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union
from urllib.parse import quote

from tag2mask.io.atomic import atomic_write_text

__all__ = ["GridCell", "GridRow", "Table", "write_report", "bar_chart_svg", "format_percent"]

PathLike = Union[str, os.PathLike]

#: largest thumbnail width in the grid (CSS pixels); narrower windows shrink them to fit all columns
THUMB_PX = 200

_STYLE = f"""
body{{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.2em 1.5em;color:#222}}
h1{{font-size:1.45em;margin:0 0 .5em}} h2{{font-size:1.1em;margin:1.4em 0 .5em}}
.note{{border-left:5px solid #4a7bd0;background:#eef3fb;padding:.5em .8em;margin:.4em 0;max-width:70em}}
.note.warning{{border-color:#d08a00;background:#fff6e0}}
table.summary{{border-collapse:collapse;margin:.4em 0}}
table.summary td,table.summary th{{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}}
table.summary td.num,table.summary th.num{{text-align:right;font-variant-numeric:tabular-nums}}
dl.kv{{display:grid;grid-template-columns:max-content auto;gap:2px 1em;margin:.4em 0}} dl.kv dt{{font-weight:600}}
dl.kv dd{{margin:0}}
.legend span{{display:inline-block;margin:0 1em .3em 0;white-space:nowrap}}
.legend i{{display:inline-block;width:.9em;height:.9em;border:1px solid #444;vertical-align:-.1em;margin-right:.3em}}
table.grid{{border-collapse:collapse}}
table.grid th{{position:sticky;top:0;background:#fff;font-weight:600;padding:4px;text-align:center;
  border-bottom:2px solid #bbb}}
table.grid td{{padding:3px;vertical-align:top;text-align:center;font-size:.85em}}
table.grid th.row{{position:static;text-align:left;border:0;font-weight:normal;max-width:9em;vertical-align:top}}
table.grid img{{width:clamp(90px,calc((100vw - 15em) / var(--cols, 4)),{THUMB_PX}px);display:block}}
.muted{{color:#777}}
.overview{{display:flex;flex-wrap:wrap;gap:0 3em;align-items:flex-start}}
"""


@dataclass
class GridCell:
    """One image of the grid: a PNG (absolute or relative to the page folder) and a short caption."""

    image: Optional[PathLike]
    caption: str = ""


@dataclass
class GridRow:
    """One grid row: a heading (scene / image name), an optional detail line, one cell per column."""

    name: str
    cells: Sequence[GridCell]
    detail: str = ""


@dataclass
class Table:
    """A summary table; ``numeric`` names the columns aligned right (numbers)."""

    header: Sequence[str]
    rows: Sequence[Sequence[object]]
    numeric: Sequence[str] = field(default_factory=tuple)


def format_percent(value: object, digits: int = 1) -> str:
    """``0.523`` -> ``"52.3"``; ``None`` / NaN -> an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    return f"{100 * float(value):.{digits}f}"


def _link(out_dir: Path, p: Optional[PathLike]) -> Optional[str]:
    """Relative, URL-quoted link to ``p`` from ``out_dir`` (so the page can be moved with its files)."""
    if p is None:
        return None
    p = Path(p)
    rel = os.path.relpath(p, out_dir) if p.is_absolute() else str(p)
    return quote(Path(rel).as_posix())


def bar_chart_svg(values: Sequence[tuple[str, Optional[float]]], title: str = "", max_value: float = 100.0,
                  unit: str = "", width: int = 620, bar_height: int = 18) -> str:
    """A horizontal bar chart as an inline ``<svg>``: one labelled bar per ``(label, value)``.

    ``None`` values get no bar and an en dash. The axis runs from 0 to ``max_value`` with grid lines
    at each quarter.
    """
    e = html.escape
    label_w, value_w, gap, top = 170, 56, 6, 8
    plot_w = width - label_w - value_w
    height = top + len(values) * (bar_height + gap) + 22
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
             f"aria-label='{e(title)}' font-family='system-ui,sans-serif' font-size='12'>"]
    if title:
        parts.append(f"<title>{e(title)}</title>")
    axis_y = top + len(values) * (bar_height + gap)
    for q in range(5):
        x = label_w + plot_w * q / 4
        parts.append(f"<line x1='{x:.1f}' y1='{top - 4}' x2='{x:.1f}' y2='{axis_y}' stroke='#ddd'/>")
        parts.append(f"<text x='{x:.1f}' y='{axis_y + 14}' text-anchor='middle' fill='#666'>"
                     f"{max_value * q / 4:g}{e(unit)}</text>")
    for i, (label, value) in enumerate(values):
        y = top + i * (bar_height + gap)
        mid = y + bar_height / 2 + 4
        parts.append(f"<text x='{label_w - 8}' y='{mid:.1f}' text-anchor='end'>{e(str(label))}</text>")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            parts.append(f"<text x='{label_w + 4}' y='{mid:.1f}' fill='#777'>\u2013</text>")
            continue
        w = max(0.0, min(1.0, float(value) / max_value)) * plot_w
        parts.append(f"<rect x='{label_w}' y='{y}' width='{w:.1f}' height='{bar_height}' fill='#4a7bd0'/>")
        parts.append(f"<text x='{label_w + w + 4:.1f}' y='{mid:.1f}'>{float(value):.1f}{e(unit)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _table_html(table: Table) -> str:
    e = html.escape
    num = set(table.numeric)
    head = "".join(f"<th class='{'num' if h in num else ''}'>{e(str(h))}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = "".join(f"<td class='{'num' if h in num else ''}'>{e(str(v))}</td>" for h, v in zip(table.header, row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table class='summary'><tr>{head}</tr>{''.join(body)}</table>"


def _legend_html(legend: Sequence[tuple[str, tuple[int, int, int]]]) -> str:
    e = html.escape
    items = "".join(f"<span><i style='background:rgb{tuple(int(c) for c in rgb)}'></i>{e(name)}</span>"
                    for name, rgb in legend)
    return f"<div class='legend'>{items}</div>"


def _grid_html(out_dir: Path, columns: Sequence[str], rows: Sequence[GridRow]) -> str:
    e = html.escape
    head = "<tr><th class='row'></th>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>"
    body = []
    for row in rows:
        detail = f"<br><span class='muted'>{e(row.detail)}</span>" if row.detail else ""
        cells = [f"<th class='row'><b>{e(row.name)}</b>{detail}</th>"]
        for col, cell in zip(columns, row.cells):
            src = _link(out_dir, cell.image)
            img = (f"<a href='{e(src)}'><img src='{e(src)}' alt='{e(row.name)}: {e(col)}' loading='lazy'></a>"
                   if src else "<span class='muted'>\u2013</span>")
            caption = f"<div>{e(cell.caption)}</div>" if cell.caption else ""
            cells.append(f"<td>{img}{caption}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='grid' style='--cols:{max(1, len(columns))}'>{head}{''.join(body)}</table>"


def write_report(
    out_dir: PathLike,
    title: str,
    *,
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
    summary: Optional[Mapping[str, object]] = None,
    table: Optional[Table] = None,
    chart: Optional[tuple[str, Sequence[tuple[str, Optional[float]]]]] = None,
    legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
    grid: Optional[tuple[Sequence[str], Sequence[GridRow]]] = None,
    grid_title: str = "",
    page_name: str = "index.html",
) -> Path:
    """Write ``out_dir/page_name`` and return its path.

    Args:
        out_dir: the run folder; image links are made relative to it.
        title: page heading.
        warnings, notes: paragraphs shown under the title (warnings highlighted).
        summary: key/value pairs (data set, image count, overall score ...).
        table: the summary table (one row per method or class).
        chart: ``(title, [(label, value in percent or None), ...])`` drawn as an inline SVG bar chart.
        legend: ``(class name, RGB colour)`` pairs of the overlay colours.
        grid: ``(column titles, rows)``; each row has one :class:`GridCell` per column.
        grid_title: heading above the grid.
    """
    out_dir = Path(out_dir)
    e = html.escape
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
    parts += [f"<p class='note warning'><b>Warning:</b> {e(w)}</p>" for w in warnings]
    parts += [f"<p class='note'>{e(n)}</p>" for n in notes]
    if summary:
        parts.append("<dl class='kv'>" + "".join(f"<dt>{e(str(k))}</dt><dd>{e(str(v))}</dd>"
                                                 for k, v in summary.items()) + "</dl>")
    overview = []  # the table and the chart side by side when the window is wide enough
    if table is not None:
        overview.append(f"<div>{_table_html(table)}</div>")
    if chart is not None:
        chart_title, values = chart
        overview.append(f"<div><h2>{e(chart_title)}</h2>{bar_chart_svg(values, title=chart_title, unit='%')}</div>")
    if overview:
        parts.append(f"<div class='overview'>{''.join(overview)}</div>")
    if grid is not None:
        columns, rows = grid
        if grid_title:
            parts.append(f"<h2>{e(grid_title)}</h2>")
        if legend:
            parts.append(_legend_html(legend))
        parts.append(_grid_html(out_dir, columns, rows))
    parts.append("</body></html>\n")
    page = out_dir / page_name
    atomic_write_text(page, "\n".join(parts))
    return page
