"""COCO run-length encoding (our own implementation) and COCO-style JSON export.

Format (compatible with pycocotools' ``mask.encode`` / ``mask.decode``):

* the mask is read in **column-major** order (down the first column, then the next);
* ``counts`` alternates run lengths of 0s and 1s, starting with 0s (so it may start with 0);
* the compressed string form writes each count, delta-coded against the count two places
  earlier for indices > 2, as a little-endian sequence of 5-bit groups; each character is
  ``48 + group`` with bit 0x20 meaning "more groups follow", and the last group's bit 0x10
  acting as the sign bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from tag2mask.io.atomic import atomic_path

__all__ = [
    "rle_counts", "counts_to_string", "string_to_counts", "encode", "decode",
    "mask_area", "mask_bbox", "masks_to_coco_json",
]


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed counts of an ``(H, W)`` bool/0-1 mask, column-major, starting with 0s."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    flat = (m.T.reshape(-1) != 0).astype(np.int8)  # transpose + C order = column-major
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts.insert(0, 0)  # runs always start with zeros
    return [int(c) for c in counts]


def counts_to_string(counts: Sequence[int]) -> str:
    """Compress counts to the COCO string form (see module doc)."""
    out: list[str] = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = x & 0x1F
            x >>= 5  # Python's >> on negatives is arithmetic, as in the C reference
            more = (x != -1) if (group & 0x10) else (x != 0)
            if more:
                group |= 0x20
            out.append(chr(group + 48))
    return "".join(out)


def string_to_counts(s: str) -> list[int]:
    """Inverse of :func:`counts_to_string`."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError(f"truncated RLE string at position {p}")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid RLE character {s[p]!r} at position {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict:
    """``(H, W)`` mask -> ``{"size": [H, W], "counts": str}`` (pycocotools-compatible)."""
    m = np.asarray(mask)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts_to_string(rle_counts(m))}


def decode(rle: Mapping) -> np.ndarray:
    """``{"size": [H, W], "counts": str | list}`` -> ``(H, W)`` uint8 0/1 mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = string_to_counts(counts)
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)} (negative runs: {any(c < 0 for c in counts)}), "
                         f"expected {h * w} for size {h}x{w}")
    values = np.zeros(len(counts), dtype=np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def mask_area(mask: np.ndarray) -> int:
    """Number of foreground pixels."""
    return int(np.count_nonzero(mask))


def mask_bbox(mask: np.ndarray) -> list[float]:
    """``[x, y, width, height]`` of the foreground (pycocotools' ``toBbox`` convention:
    width = x_max - x_min + 1); all zeros for an empty mask."""
    m = np.asarray(mask) != 0
    if not m.any():
        return [0.0, 0.0, 0.0, 0.0]
    ys = np.flatnonzero(m.any(axis=1))
    xs = np.flatnonzero(m.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


def masks_to_coco_json(
    path: str | Path,
    items: Iterable[tuple[str, np.ndarray]],
    class_names: Sequence[str],
    category_ids: Sequence[int] | None = None,
    include_background: bool = False,
    ignore_index: int = 255,
) -> dict:
    """Write one COCO annotation per (image, class present) from semantic label maps.

    Args:
        path: output ``.json`` (written atomically).
        items: ``(file_name, label (H, W) uint8)`` pairs; label value ``k >= 1`` is
            ``class_names[k - 1]``, 0 is background, ``ignore_index`` is skipped.
        class_names: foreground names.
        category_ids: COCO category id per foreground class (default ``1..len(class_names)``;
            pass COCO's sparse ids to match official annotation files).
        include_background: also export class 0 as category id 0 named ``"background"``.

    Returns:
        the written dict (``images``, ``categories``, ``annotations``).
    """
    names = list(class_names)
    cat_ids = list(category_ids) if category_ids is not None else list(range(1, len(names) + 1))
    if len(cat_ids) != len(names):
        raise ValueError(f"{len(cat_ids)} category ids for {len(names)} class names")
    categories = [{"id": int(i), "name": n} for i, n in zip(cat_ids, names)]
    if include_background:
        categories.insert(0, {"id": 0, "name": "background"})
    images, annotations = [], []
    for image_id, (file_name, label) in enumerate(items, start=1):
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"{file_name}: label map must be (H, W), got {label.shape}")
        h, w = label.shape
        images.append({"id": image_id, "file_name": str(file_name), "height": int(h), "width": int(w)})
        for v in np.unique(label):
            v = int(v)
            if v == ignore_index or (v == 0 and not include_background):
                continue
            if v > len(names):
                raise ValueError(f"{file_name}: label value {v} exceeds the {len(names)} class names")
            m = label == v
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 0 if v == 0 else int(cat_ids[v - 1]),
                "segmentation": encode(m),
                "area": mask_area(m),
                "bbox": mask_bbox(m),
                "iscrowd": 0,
            })
    data = {"images": images, "categories": categories, "annotations": annotations}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))
    return data
