"""The bench reports: ``results.json``, ``results.csv``, ``results.md`` (the papers' table) and ``index.html``.

The table has the papers' shape: one row per method, one column per benchmark in the papers' order
(VOC21, PC60, Object, VOC20, PC59, Stuff, City, ADE) and their average, mIoU in percent. A cell whose
run scored fewer images than the full validation set (``--limit``, a partial layout) or had failed
images is marked, and the notes under the table say by how much. A method the bench cannot run
(``status`` ``skipped``: it needs inputs the bench does not have) shows "–" and its reason in the notes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from tag2mask.io.atomic import atomic_write_text

__all__ = ["write_reports", "paper_table", "markdown_table"]

_CSV_FIELDS = ("dataset", "method", "status", "skip_reason", "preset", "miou", "pixel_accuracy", "mean_accuracy", "images", "failed",
               "full_val_set", "num_classes", "names_source", "written", "skipped", "seconds")


def _pct(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(100.0 * value, 2)


def paper_table(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"datasets": [...], "titles": [...], "rows": {method: {dataset: mIoU %, ..., "avg": ...}}}``.

    ``avg`` is the mean over the run's benchmarks, present only when every one of them has a score.
    """
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    titles = {r["dataset"]: r["title"] for r in results}
    rows: dict[str, dict[str, Optional[float]]] = {}
    for r in results:
        rows.setdefault(r["method"], {})[r["dataset"]] = _pct(r["miou"])
    for row in rows.values():
        values = [row.get(d) for d in datasets]
        row["avg"] = round(sum(values) / len(values), 2) if values and None not in values else None
    return {"datasets": datasets, "titles": [titles[d] for d in datasets], "rows": rows}


def _marks(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """``*``: fewer images than the full validation set; ``†``: some images failed."""
    marks = {}
    for r in _ran(results):
        m = ("*" if r["images"] + r["failed"] < r["full_val_set"] else "") + ("\u2020" if r["failed"] else "")
        marks[(r["method"], r["dataset"])] = m
    return marks


def _ran(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells that ran (not skipped)."""
    return [r for r in results if r.get("status") != "skipped"]


def _skip_notes(results: Sequence[dict[str, Any]]) -> list[str]:
    """One note per (method, reason) of the skipped cells, naming the benchmarks."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if r.get("status") == "skipped":
            grouped.setdefault((r["method"], r["skip_reason"]), []).append(r["title"])
    return [f"- skipped: {method} on {', '.join(titles)}: {reason}" for (method, reason), titles in grouped.items()]


def _miou_rule(results: Sequence[dict[str, Any]]) -> Optional[str]:
    ran = _ran(results)
    return ran[0]["miou_rule"] if ran else None


def _fmt(value: Optional[float]) -> str:
    return "\u2013" if value is None else f"{value:.1f}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """The papers' table in Markdown (methods x benchmarks + average, mIoU %), with its notes."""
    table, marks = paper_table(results), _marks(results)
    n = len(table["datasets"])
    head = ["Method", *table["titles"], f"Avg ({n})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for method, row in table["rows"].items():
        cells = [_fmt(row.get(d)) + marks.get((method, d), "") for d in table["datasets"]]
        lines.append("| " + " | ".join([method, *cells, _fmt(row["avg"])]) + " |")
    notes = ["", "mIoU (%), mmseg's protocol (mean over the classes present in the ground truth or the prediction; "
             "ground truth 255 ignored). Images scored per benchmark:"]
    seen = set()
    for r in _ran(results):
        if r["dataset"] in seen:
            continue
        seen.add(r["dataset"])
        notes.append(f"- {r['title']}: {r['images']} of {r['full_val_set']} validation images"
                     f"{' (partial: marked *)' if r['images'] + r['failed'] < r['full_val_set'] else ''}; "
                     f"{r['num_classes']} classes, name set {r['names_source']}")
    failed = [r for r in results if r["failed"]]
    for r in failed:
        notes.append(f"- \u2020 {r['method']} on {r['title']}: {r['failed']} image(s) failed, see {r['cell']}/manifest.jsonl")
    notes += _skip_notes(results)
    return "\n".join(lines + notes) + "\n"


def _csv(results: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(_CSV_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow({k: r.get(k) for k in _CSV_FIELDS})
    return buf.getvalue()


def _speed(results: Sequence[dict[str, Any]], device: Optional[str]) -> dict[str, Any]:
    written = sum(r.get("written", 0) for r in results)
    seconds = sum(r.get("seconds", 0.0) for r in results if r.get("written"))
    return {"images_written": written, "seconds": round(seconds, 3), "device": device,
            "images_per_second": round(written / seconds, 3) if seconds > 0 else None,
            "note": "end to end per cell: building the method, decoding, model, scoring and writing"}


def _ground_truth_overlays(out: Path, cells: Sequence[Any], results: Sequence[dict[str, Any]],
                           count: int) -> dict[str, list[tuple[str, Path]]]:
    """Overlays of the ground truth of the first ``count`` images of each benchmark (``OUT/overlays``)."""
    import numpy as np
    from PIL import Image

    from tag2mask.bench.datasets import read_ground_truth
    from tag2mask.bench.harness import save_overlay_for
    from tag2mask.data.images import to_rgb

    shown: dict[str, list[tuple[str, Path]]] = {}
    for cell, r in zip(cells, results):
        name = cell.spec.name
        if name in shown or r.get("status") == "skipped":
            continue
        shown[name] = []
        for item in cell.dataset.items[: min(count, r["images"] + r["failed"])]:
            path = out / "overlays" / name / "gt" / f"{item.key}.png"
            try:
                with Image.open(item.image) as img:
                    img.load()
                    rgb = np.asarray(to_rgb(img), dtype=np.uint8)
                gt = read_ground_truth(item.gt, cell.spec, cell.num_classes)
                save_overlay_for(path, rgb, gt, cell.class_names, cell.spec.has_background)
            except (OSError, ValueError):  # an image that failed in the cells too (its error record says why)
                continue
            shown[name].append((item.key, path))
    return shown


def _html(out: Path, cells: Sequence[Any], results: Sequence[dict[str, Any]], record: dict[str, Any],
          overlays: int, speed: dict[str, Any]) -> None:
    from tag2mask.io.html_report import GridCell, GridRow, Table, write_report

    table, marks = paper_table(results), _marks(results)
    methods = list(table["rows"])
    header = ["method", *table["titles"], f"Avg ({len(table['datasets'])})"]
    rows = [[m, *[_fmt(row.get(d)) + marks.get((m, d), "") for d in table["datasets"]], _fmt(row["avg"])]
            for m, row in table["rows"].items()]
    chart = [(f"{r['method']} \u00b7 {r['title']}", _pct(r["miou"])) for r in _ran(results)]
    by_cell = {(c.spec.name, c.method): c for c in cells}
    grid_rows = []
    for name, shown in _ground_truth_overlays(out, cells, results, overlays).items():
        title = next(r["title"] for r in results if r["dataset"] == name)
        for key, gt_path in shown:
            preds = []
            for m in methods:
                p = by_cell[(name, m)].out / "overlays" / f"{key}.png" if (name, m) in by_cell else None
                preds.append(GridCell(p if p is not None and p.is_file() else None, m))
            grid_rows.append(GridRow(f"{title} \u00b7 {key}", [GridCell(gt_path, "ground truth"), *preds]))
    notes = [line.lstrip("- ") for line in markdown_table(results).split("\n\n", 1)[1].strip().splitlines()]
    rate = speed["images_per_second"]
    summary = {"preset": record.get("preset"), "weights": record.get("weights"), "device": record.get("device"),
               "images/s": rate if rate is not None else "\u2013 (every image was already done: resumed)",
               "mIoU rule": _miou_rule(results)}
    write_report(out, "tag2mask bench: open-vocabulary methods on the benchmarks", warnings=record.get("warnings", ()),
                 notes=notes, summary=summary, table=Table(header, rows, numeric=header[1:]),
                 chart=("mIoU per (method, benchmark)", chart), grid=(["ground truth", *methods], grid_rows),
                 grid_title="Overlays (first images of each benchmark)")


def write_reports(out: Path, cells: Sequence[Any], results: Sequence[dict[str, Any]], record: dict[str, Any],
                  options: Any) -> None:
    """Write ``results.json``, ``results.csv``, ``results.md`` and ``index.html`` into ``out`` (atomically)."""
    out = Path(out)
    speed = _speed(results, record.get("device"))
    table = paper_table(results)
    payload = {**record, "limit": options.limit, "miou_rule": _miou_rule(results),
               "datasets": table["datasets"], "methods": list(table["rows"]), "table": table["rows"],
               "speed": speed, "cells": list(results)}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1, ensure_ascii=False, default=str))
    atomic_write_text(out / "results.csv", _csv(results))
    atomic_write_text(out / "results.md", markdown_table(results))
    _html(out, cells, results, record, options.overlays, speed)
