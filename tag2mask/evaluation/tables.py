"""Score tables as text: one row per class plus the summary rows (``eval``, ``train segmenter``, ``train clip-zss``)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["pct", "format_table"]


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:6.2f}"


def format_table(names: Sequence[str], columns: dict[str, dict]) -> str:
    """Markdown-style table: one row per class + summary rows, one column per setting."""
    heads = list(columns)
    width = max(12, *(len(n) for n in names))
    lines = [f"| {'class':<{width}} | " + " | ".join(f"{h:>7}" for h in heads) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * 9 for _ in heads) + "|"]
    for i, n in enumerate(names):
        vals = [columns[h]["Class IoU"][i] for h in heads]
        if all(v is None for v in vals):
            continue  # absent from GT and prediction: excluded, not shown as 0
        lines.append(f"| {n:<{width}} | " + " | ".join(f"{pct(v):>7}" for v in vals) + " |")
    for key, label in (("Mean IoU", "mIoU"), ("Pixel Accuracy", "pixel acc"), ("Mean Accuracy", "mean acc")):
        lines.append(f"| {label:<{width}} | " + " | ".join(f"{pct(columns[h][key]):>7}" for h in heads) + " |")
    return "\n".join(lines)
