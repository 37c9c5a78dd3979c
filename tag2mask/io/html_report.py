"""A static ``index.html`` for a run: one row per image with photo, overlay and IoU."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import quote

from tag2mask.io.atomic import atomic_write_text

__all__ = ["write_index_html"]

_STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{max-width:320px;max-height:320px}"""


def _src(out_dir: Path, p: str | os.PathLike | None) -> str | None:
    """Relative, URL-quoted link to ``p`` from ``out_dir`` (so the page can be moved with its files)."""
    if p is None:
        return None
    p = Path(p)
    rel = os.path.relpath(p, out_dir) if p.is_absolute() else str(p)
    return quote(Path(rel).as_posix())


def _fmt_iou(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "&ndash;"
    return f"{100 * float(v):.1f}"


def write_index_html(out_dir: str | Path, rows: Iterable[Mapping], title: str = "tag2mask run",
                     summary: Mapping[str, object] | None = None) -> Path:
    """Write ``out_dir/index.html``.

    Args:
        out_dir: run folder (links are made relative to it).
        rows: mappings with ``name`` and optional ``image``, ``overlay``, ``gt_overlay``, ``cam`` (paths, absolute
            or relative to ``out_dir``), ``labels`` (list of names) and ``iou`` (per-image mIoU
            in [0, 1], shown as a percentage; the column appears when any row has GT).
        title: page title.
        summary: optional key/value pairs shown above the table (e.g. dataset mIoU).

    Returns:
        the path of the written page.
    """
    out_dir = Path(out_dir)
    rows = list(rows)
    has_iou = any("iou" in r for r in rows)
    has_cam = any(r.get("cam") for r in rows)
    has_gt = any(r.get("gt_overlay") for r in rows)
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{e(title)}</h1>"]
    if summary:
        parts.append("<ul>" + "".join(f"<li><b>{e(str(k))}</b>: {e(str(v))}</li>" for k, v in summary.items())
                     + "</ul>")
    head = (["name", "image", "overlay"] + (["GT overlay"] if has_gt else []) + (["CAM"] if has_cam else [])
            + ["labels"] + (["mIoU (%)"] if has_iou else []))
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for r in rows:
        cells = [e(str(r.get("name", "")))]
        keys = ("image", "overlay") + (("gt_overlay",) if has_gt else ()) + (("cam",) if has_cam else ())
        for key in keys:
            src = _src(out_dir, r.get(key))
            cells.append(f"<a href='{e(src)}'><img src='{e(src)}' alt='{e(key)}' loading='lazy'></a>" if src else "")
        cells.append(e(", ".join(str(x) for x in r.get("labels", []) or [])))
        if has_iou:
            cells.append(_fmt_iou(r.get("iou")))
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table></body></html>\n")
    page = out_dir / "index.html"
    atomic_write_text(page, "\n".join(parts))
    return page
