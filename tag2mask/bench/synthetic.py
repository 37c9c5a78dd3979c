"""Tiny copies of the benchmark layouts filled with the synthetic shapes world (tests, docs, smoke runs).

:func:`write_synthetic_layout` writes ``n`` scenes of :mod:`tag2mask.synth` into the layout of one
benchmark exactly as mmseg's tools would (folders, split file, file-name endings) and encodes the
ground truth in that benchmark's raw convention, so the reader applies the benchmark's own rules:

* background datasets (VOC21, PC60, COCO-Object): 0 background, object ``k`` -> ``k``, 255 void;
* reduce-zero datasets (VOC20, PC59, ADE20K): the same file; the reader drops 0 and shifts by one;
* COCO-Stuff, Cityscapes (no background, no reduction): object ``k`` -> ``k - 1``, background -> 255.

The synthetic world has its own classes (12 shapes, 6 background textures), so it comes with its own
name set (:func:`synthetic_names`): ``tag2mask bench --names-DATASET FILE`` scores with it instead of the
official ``cls_*.txt``. The data root gets the synthetic-export marker, so the shipped tiny CLIP (which
knows only this world) runs without its toy-model warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import numpy as np

from tag2mask.bench.datasets import IGNORE_INDEX, BenchmarkSpec, get_spec

__all__ = ["write_synthetic_layout", "synthetic_names"]


def synthetic_names(spec: Union[str, BenchmarkSpec]) -> str:
    """The name-set text of the synthetic world for ``spec``: background line (stuff) first where it has one."""
    from tag2mask.synth.world import OBJECT_NAMES, STUFF_NAMES

    spec = get_spec(spec) if isinstance(spec, str) else spec
    lines = ([", ".join(STUFF_NAMES)] if spec.has_background else []) + list(OBJECT_NAMES)
    return "\n".join(lines) + "\n"


def _raw_ground_truth(mask: np.ndarray, spec: BenchmarkSpec) -> np.ndarray:
    """``(H, W)`` uint8 scene mask (0 bg, 1..N, 255 void) -> the benchmark's raw file values."""
    if spec.has_background or spec.reduce_zero_label:
        return mask
    out = mask.astype(np.int16) - 1
    out[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


def _save_image(path: Path, array: np.ndarray) -> None:
    """``(H, W)`` or ``(H, W, 3)`` uint8 -> PNG or JPEG (by suffix), atomically."""
    from PIL import Image

    from tag2mask.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        if path.suffix == ".png":
            Image.fromarray(array).save(tmp, format="PNG")
        else:
            Image.fromarray(array).save(tmp, format="JPEG", quality=95)


def write_synthetic_layout(data_root: Union[str, os.PathLike], benchmark: Union[str, BenchmarkSpec], n: int = 4,
                           *, seed: int = 0, size: int = 112) -> Path:
    """Write ``n`` synthetic scenes as benchmark ``benchmark``'s layout under ``data_root``; returns the
    name-set file written next to it (``data_root/synthetic-names/cls_<config>.txt``).

    Images are ``size`` x ``size`` JPEG (PNG for Cityscapes, as its ``_leftImg8bit.png``); scene ``i``
    uses seed ``seed + i``. Layouts that share a folder (VOC21 / VOC20, PC60 / PC59) share the images.
    Every file is written atomically.
    """
    from tag2mask.io.atomic import atomic_write_text
    from tag2mask.synth.export import MARKER_NAME
    from tag2mask.synth.scenes import generate_scene

    spec = get_spec(benchmark) if isinstance(benchmark, str) else benchmark
    root = Path(data_root) / spec.folders[0]
    keys = []
    for i in range(n):
        scene = generate_scene(seed + i, size=size)
        key = f"frankfurt/frankfurt_{i:06d}_000019" if spec.recursive else f"{2000 + seed + i:06d}"
        keys.append(key)
        _save_image(root / spec.image_dir / f"{key}{spec.image_suffix}", scene.image)
        _save_image(root / spec.gt_dir / f"{key}{spec.gt_suffix}", _raw_ground_truth(scene.mask, spec))
    if spec.split_file is not None:
        atomic_write_text(root / spec.split_file, "\n".join(keys) + "\n")
    names = Path(data_root) / "synthetic-names" / f"cls_{spec.config}.txt"
    atomic_write_text(names, synthetic_names(spec))
    atomic_write_text(Path(data_root) / MARKER_NAME, json.dumps({"generator": "tag2mask synthetic world",
                                                                 "layout": "mmseg benchmark layouts"}) + "\n")
    return names
