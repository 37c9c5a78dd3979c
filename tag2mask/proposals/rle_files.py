"""Precomputed proposals: one JSON file of COCO run-length-encoded masks per image.

Accepted layouts of ``<folder>/<item>.json``:

* a list of annotations, as Segment Anything's ``scripts/amg.py --convert-to-rle`` writes them
  (``segmentation``, ``area``, ``bbox``, ``predicted_iou``, ...);
* an object with an ``annotations`` list (what :func:`write_proposals_json` writes; it adds the
  image ``size`` and each mask's ``level``).

Each ``segmentation`` is a COCO RLE ``{"size": [H, W], "counts": ...}`` with compressed (string)
or uncompressed (list of run lengths) counts. Optional fields: ``area`` (used as the mask's area,
as FMA-WSSS does), ``level`` (0/1/2), ``predicted_iou`` / ``score``. Polygons are not accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import numpy as np

from tag2mask.io import coco_rle
from tag2mask.io.atomic import atomic_path
from tag2mask.proposals.base import MaskProposals, ProposalError

#: largest mask decoded from an RLE proposal (the default --max-decode-pixels of the image decoder)
MAX_RLE_PIXELS = 100_000_000

__all__ = ["read_proposals_json", "write_proposals_json", "RLEFolderProposals"]


def _fail(path: Path, message: str) -> ProposalError:
    return ProposalError(f"{path}: {message}")


def _annotations(data: Any, path: Path) -> list:
    if isinstance(data, dict):
        if "annotations" not in data:
            raise _fail(path, "expected a list of annotations or an object with an 'annotations' list")
        data = data["annotations"]
    if not isinstance(data, list):
        raise _fail(path, f"expected a list of annotations, found {type(data).__name__}")
    return data


def read_proposals_json(path: Union[str, Path], image_size: tuple[int, int] | None = None) -> MaskProposals:
    """Read one proposal file; ``image_size`` (H, W), when given, must match every mask.

    Raises :class:`ProposalError` naming the file (and the annotation) for anything malformed:
    invalid JSON, missing or polygon segmentations, counts that do not add up to H * W, a size
    that differs from the image, a negative area or level.
    """
    path = Path(path)
    from tag2mask.io.json_files import read_json

    try:
        data = read_json(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise _fail(path, f"not a readable JSON file ({type(e).__name__}: {e})") from e
    anns = _annotations(data, path)
    masks, levels, areas, scores = [], [], [], []
    size = tuple(image_size) if image_size is not None else None
    if isinstance(data, dict) and "size" in data:
        try:
            declared = tuple(int(v) for v in data["size"])
        except (TypeError, ValueError) as e:
            raise _fail(path, f"bad 'size' {data['size']!r}") from e
        if size is not None and declared != size:
            raise _fail(path, f"is for a {declared[0]}x{declared[1]} image but the image is {size[0]}x{size[1]}")
        size = declared
    for i, ann in enumerate(anns):
        where = f"annotation {i}"
        if not isinstance(ann, dict) or "segmentation" not in ann:
            raise _fail(path, f"{where} has no 'segmentation'")
        seg = ann["segmentation"]
        if isinstance(seg, list):
            raise _fail(path, f"{where} is a polygon; only RLE masks are accepted (run SAM's amg.py with --convert-to-rle)")
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise _fail(path, f"{where}: segmentation must be an RLE object with 'size' and 'counts'")
        try:
            rle_size = tuple(int(v) for v in seg["size"])
            if len(rle_size) != 2 or min(rle_size) < 1:
                raise ValueError(f"bad size {seg['size']!r}")
            # the size is checked before decoding: a few bytes of RLE can describe gigapixels
            expected = size if size is not None else rle_size
            if rle_size != expected:
                raise _fail(path, f"{where} is {rle_size[0]}x{rle_size[1]} but the image is {expected[0]}x{expected[1]}")
            if rle_size[0] * rle_size[1] > MAX_RLE_PIXELS:
                raise _fail(path, f"{where} is {rle_size[0]}x{rle_size[1]}, more than {MAX_RLE_PIXELS:,} pixels")
            mask = coco_rle.decode(seg).astype(bool)
        except ProposalError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise _fail(path, f"{where}: invalid RLE ({e})") from e
        if size is None:
            size = rle_size
        if rle_size != size:
            raise _fail(path, f"{where} is {rle_size[0]}x{rle_size[1]} but the image is {size[0]}x{size[1]}")
        pixels = int(mask.sum())
        area = ann.get("area", pixels)
        level = ann.get("level", 0)
        if not isinstance(area, (int, float)) or area < 0 or not isinstance(level, (int, float)) or level < 0:
            raise _fail(path, f"{where}: 'area' and 'level' must be non-negative numbers")
        if pixels == 0:
            continue  # an empty mask votes for nothing
        masks.append(mask)
        areas.append(int(round(area)) if area > 0 else pixels)
        levels.append(int(level))
        score = ann.get("predicted_iou", ann.get("score"))
        scores.append(float(score) if isinstance(score, (int, float)) else np.nan)
    if size is None:
        raise _fail(path, "holds no masks and the image size is unknown")
    if not masks:
        return MaskProposals.empty(*size)
    return MaskProposals(np.stack(masks), np.asarray(levels), np.asarray(areas), np.asarray(scores, np.float32))


def write_proposals_json(path: Union[str, Path], proposals: MaskProposals, compressed: bool = True) -> None:
    """Write ``proposals`` atomically (compressed string counts, or uncompressed run lengths)."""
    anns = []
    for i in range(len(proposals)):
        mask = proposals.masks[i]
        if compressed:
            seg = coco_rle.encode(mask)
        else:
            seg = {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": coco_rle.rle_counts(mask)}
        ann = {"segmentation": seg, "area": int(proposals.areas[i]), "bbox": coco_rle.mask_bbox(mask),
               "level": int(proposals.levels[i])}
        if proposals.scores is not None and np.isfinite(proposals.scores[i]):
            ann["predicted_iou"] = float(proposals.scores[i])
        anns.append(ann)
    h, w = proposals.image_size
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"size": [h, w], "annotations": anns}), encoding="utf-8")


class RLEFolderProposals:
    """:class:`tag2mask.proposals.base.ProposalSource` reading ``<folder>/<key>.json``."""

    name = "files"

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"proposal folder not found: {self.folder}")

    def path_for(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def __call__(self, image: np.ndarray, key: str) -> MaskProposals:
        path = self.path_for(key)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no proposal file for {key!r}")
        return read_proposals_json(path, image_size=image.shape[:2])

    def describe(self) -> dict:
        return {"source": "files", "folder": str(self.folder)}
