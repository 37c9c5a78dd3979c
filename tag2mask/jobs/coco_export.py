"""COCO-style JSON (RLE masks) for a finished run, built from its manifest with flat memory.

:func:`tag2mask.io.coco_rle.masks_to_coco_json` keeps every annotation in memory; a labelling run
over a large data set would not. Here images and annotations are streamed into two temporary
files and joined, so memory is one mask at a time. Items are taken from the compacted manifest
(sorted by item name), so image ids are the same whatever the number of ranks that made the run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from tag2mask.io.atomic import atomic_path
from tag2mask.io.coco_rle import encode, mask_area, mask_bbox
from tag2mask.io.manifest import MANIFEST_NAME, iter_records
from tag2mask.io.palette import read_label_png
from tag2mask.io.paths import path_inside

__all__ = ["write_coco_from_manifest"]


def write_coco_from_manifest(run_dir: str | Path, class_names: Sequence[str], path: str | Path,
                             mask_prefix: str = "masks/", ignore_index: int = 255) -> dict[str, int]:
    """Write ``path`` (COCO JSON) with one annotation per (image, class present) of every ``ok`` item.

    Mask value ``k >= 1`` is category ``k`` named ``class_names[k - 1]``; 0 (background) and
    ``ignore_index`` are skipped. ``file_name`` is the record's ``image`` field when present
    (the image path relative to the input folder), else the item name.

    Returns:
        ``{"images": n, "annotations": m}``.

    Raises:
        ValueError: a mask holds a value beyond the class list (names the mask file).
    """
    run_dir = Path(run_dir)
    names = list(class_names)
    n_images = n_ann = 0
    fd, side_name = tempfile.mkstemp(prefix=".coco-annotations.", suffix=".tmp", dir=run_dir)
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out, \
                os.fdopen(fd, "w+", encoding="utf-8") as side:
            out.write('{"images": [')
            for rec in iter_records(run_dir / MANIFEST_NAME):
                if rec.get("status") != "ok":
                    continue
                mask_rel = next((p for p in rec.get("outputs", []) if p.startswith(mask_prefix)), None)
                if mask_rel is None:
                    continue
                mask_path = path_inside(run_dir, mask_rel, run_dir / MANIFEST_NAME)
                label = read_label_png(mask_path)
                n_images += 1
                h, w = label.shape
                entry = {"id": n_images, "file_name": rec.get("image", rec["item"]), "height": int(h), "width": int(w)}
                out.write(("" if n_images == 1 else ", ") + json.dumps(entry, ensure_ascii=False))
                for v in np.unique(label):
                    v = int(v)
                    if v in (0, ignore_index):
                        continue
                    if v > len(names):
                        raise ValueError(f"{mask_path}: label value {v} exceeds the {len(names)} class names")
                    m = label == v
                    n_ann += 1
                    ann = {"id": n_ann, "image_id": n_images, "category_id": v, "segmentation": encode(m),
                           "area": mask_area(m), "bbox": mask_bbox(m), "iscrowd": 0}
                    side.write(("" if n_ann == 1 else ", ") + json.dumps(ann) + "\n")
            categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
            out.write('], "categories": ' + json.dumps(categories, ensure_ascii=False) + ', "annotations": [')
            side.flush()
            side.seek(0)
            for line in side:
                out.write(line)
            out.write("]}\n")
    finally:
        try:
            os.unlink(side_name)
        except OSError:
            pass
    return {"images": n_images, "annotations": n_ann}
