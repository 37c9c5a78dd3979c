"""Tag files: the official ``<image id> <class id> ...`` lines and the JSON that ``label --labels`` reads.

Writes are atomic (a crash leaves the previous file or none, never half a file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from tag2mask.io.atomic import atomic_write_text

__all__ = ["write_tag_lines", "read_tag_lines", "write_tags_json", "gt_matrix"]


def write_tag_lines(path: str | Path, rows: Sequence[tuple[str, Sequence[int]]]) -> None:
    """One line ``<image id> <c1> <c2> ...`` per image (0-based class ids, ascending), as ``classify.py --save_file``."""
    text = "".join(" ".join([name, *(str(int(c)) for c in ids)]) + "\n" for name, ids in rows)
    atomic_write_text(path, text)


def read_tag_lines(path: str | Path, id_map: Optional[Mapping[int, int]] = None) -> dict[str, list[int]]:
    """``{image id: [class id, ...]}`` from ``<image id> <c1> ...`` lines (official split/tag files).

    ``id_map`` translates file ids (e.g. COCO-Stuff's 182-space ids) to class positions; ids it does
    not know are an error.
    """
    out: dict[str, list[int]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (expected '<image id> <class id> ...' lines)") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            ids = [int(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected '<image id> <class id> ...', got {line!r}") from None
        if id_map is not None:
            unknown = [i for i in ids if i not in id_map]
            if unknown:
                raise ValueError(f"{path}:{lineno}: class ids {unknown} are not in this vocabulary's id space")
            ids = [id_map[i] for i in ids]
        if parts[0] in out:
            raise ValueError(f"{path}:{lineno}: image {parts[0]!r} is listed twice")
        out[parts[0]] = ids
    return out


def write_tags_json(path: str | Path, tags: Mapping[str, Sequence[str]]) -> None:
    """``{"<image file>": ["class", ...]}``: the label file format of ``tag2mask label --labels``."""
    atomic_write_text(path, json.dumps({k: list(v) for k, v in tags.items()}, indent=1) + "\n")


def gt_matrix(names: Sequence[str], gt: Mapping[str, Sequence[int]], num_classes: int) -> tuple[np.ndarray, list[str]]:
    """``(N, K)`` uint8 0/1 rows for the images in ``names`` that ``gt`` lists, and those names."""
    kept = [n for n in names if n in gt]
    y = np.zeros((len(kept), num_classes), dtype=np.uint8)
    for i, n in enumerate(kept):
        for c in gt[n]:
            if not 0 <= c < num_classes:
                raise ValueError(f"ground truth of {n!r}: class id {c} outside 0..{num_classes - 1}")
            y[i, c] = 1
    return y, kept
