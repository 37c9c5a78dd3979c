"""Readers of mmseg's prepared layouts for the 8 benchmarks the training-free segmentation papers print.

Every paper of the SCLIP family (SCLIP, NACLIP, ClearCLIP, SC-CLIP, CorrCLIP, ...) evaluates on the same
8 validation sets, prepared with mmsegmentation's data-preparation tools, with the same protocol:

========= ================================ ======= ========== ============ ===========================
name      layout (under ``--data ROOT``)   classes background reduce-zero  ground truth
========= ================================ ======= ========== ============ ===========================
voc21     VOCdevkit/VOC2012                21      label 0    no           SegmentationClass/*.png
pc60      VOCdevkit/VOC2010                60      label 0    no           SegmentationClassContext/*.png
object    coco_object                      81      label 0    no           annotations/val2017/*_instanceTrainIds.png
voc20     VOCdevkit/VOC2012                20      none       yes          SegmentationClass/*.png
pc59      VOCdevkit/VOC2010                59      none       yes          SegmentationClassContext/*.png
stuff     coco_stuff164k                   171     none       no           annotations/val2017/*_labelTrainIds.png
city      cityscapes                       19      none       no           gtFine/val/*/*_gtFine_labelTrainIds.png
ade       ade/ADEChallengeData2016         150     none       yes          annotations/validation/*.png
========= ================================ ======= ========== ============ ===========================

Ground-truth value 255 is ignored everywhere, and so is any value ``>= classes``. "Reduce-zero" is
mmseg's ``reduce_zero_label``: 0 becomes 255 (ignored) and every other value drops by one, so VOC20 and
PC59 score only the object classes (background pixels are not counted) and ADE20K drops its "other" 0.
On the background datasets (VOC21, PC60, COCO-Object) a method predicts label 0 for background: the
first line of the name set lists background words, and ``prob_thd`` turns unsure pixels into it.

COCO-Object is COCO-Stuff 164k's raw annotations (``annotations/val2017/<id>.png``) with the 80 thing
classes renumbered 1..80 and every stuff class set to 0, written as ``<id>_instanceTrainIds.png`` by
``datasets/cvt_coco_object.py`` of the SCLIP / NACLIP repositories (into a folder of its own, or into the
COCO-Stuff folder itself, so both ``ROOT/coco_object`` and ``ROOT/coco_stuff164k`` are looked in).

This module is the shared data layer: it imports nothing from ``tag2mask.methods`` or ``tag2mask.cli``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["BenchmarkSpec", "BenchmarkItem", "BenchmarkDataset", "LayoutError", "BENCHMARKS", "BENCHMARK_NAMES",
           "IGNORE_INDEX", "get_spec", "names_file", "open_benchmark", "open_benchmarks", "read_ground_truth", "reduce_zero_label"]

IGNORE_INDEX = 255


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: where its prepared layout lives and how it is scored.

    Attributes:
        name: short name (``voc21``); ``title``: the papers' column heading (``VOC21``).
        config: the official harness's dataset name (``configs/cfg_<config>.py``, ``published:<config>``).
        num_classes: classes scored (background included where the dataset has one).
        has_background: label 0 is background and the name set's first line lists background words.
        reduce_zero_label: mmseg's rule: ground-truth 0 -> ignored, the rest minus one.
        folders: candidate folders under ``--data ROOT``, tried in order.
        image_dir, gt_dir: sub-folders of the layout; image_suffix, gt_suffix: file-name endings.
        split_file: the list of item stems (``None``: every image in ``image_dir``).
        recursive: images sit in sub-folders (Cityscapes' cities).
        val_images: size of the full validation set (results flag a partial run).
        prepare: how the layout is made (mmseg's conversion tool), quoted in errors.
    """

    name: str
    title: str
    config: str
    num_classes: int
    has_background: bool
    reduce_zero_label: bool
    folders: tuple[str, ...]
    image_dir: str
    gt_dir: str
    image_suffix: str
    gt_suffix: str
    split_file: Optional[str]
    recursive: bool
    val_images: int
    prepare: str

    @property
    def option(self) -> str:
        """The per-dataset override option of ``tag2mask bench``."""
        return f"--data-{self.name}"


_VOC_PREP = "VOCtrainval_11-May-2012.tar as extracted (mmseg's data-preparation guide, 'Pascal VOC')"
_PC_PREP = ("VOC2010 + mmseg's tools/dataset_converters/pascal_context.py (writes SegmentationClassContext/ and "
            "ImageSets/SegmentationContext/ from trainval_merged.json)")
_STUFF_PREP = "mmseg's tools/dataset_converters/coco_stuff164k.py (writes the *_labelTrainIds.png files)"
_OBJECT_PREP = ("datasets/cvt_coco_object.py of the SCLIP / NACLIP repositories, run on COCO-Stuff 164k "
                "(writes the *_instanceTrainIds.png files)")
_CITY_PREP = "mmseg's tools/dataset_converters/cityscapes.py (writes the *_gtFine_labelTrainIds.png files)"
_ADE_PREP = "ADEChallengeData2016.zip as extracted (mmseg's data-preparation guide, 'ADE20K')"


def _voc(name: str, title: str, config: str, classes: int, background: bool) -> BenchmarkSpec:
    return BenchmarkSpec(name, title, config, classes, background, not background, ("VOCdevkit/VOC2012",),
                         "JPEGImages", "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/val.txt",
                         False, 1449, _VOC_PREP)


def _context(name: str, title: str, config: str, classes: int, background: bool) -> BenchmarkSpec:
    return BenchmarkSpec(name, title, config, classes, background, not background, ("VOCdevkit/VOC2010",),
                         "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
                         "ImageSets/SegmentationContext/val.txt", False, 5105, _PC_PREP)


#: the 8 benchmarks in the papers' column order
BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in (
    _voc("voc21", "VOC21", "voc21", 21, True),
    _context("pc60", "PC60", "context60", 60, True),
    BenchmarkSpec("object", "Object", "coco_object", 81, True, False, ("coco_object", "coco_stuff164k"),
                  "images/val2017", "annotations/val2017", ".jpg", "_instanceTrainIds.png", None, False, 5000,
                  _OBJECT_PREP),
    _voc("voc20", "VOC20", "voc20", 20, False),
    _context("pc59", "PC59", "context59", 59, False),
    BenchmarkSpec("stuff", "Stuff", "coco_stuff", 171, False, False, ("coco_stuff164k",), "images/val2017",
                  "annotations/val2017", ".jpg", "_labelTrainIds.png", None, False, 5000, _STUFF_PREP),
    BenchmarkSpec("city", "City", "city_scapes", 19, False, False, ("cityscapes",), "leftImg8bit/val", "gtFine/val",
                  "_leftImg8bit.png", "_gtFine_labelTrainIds.png", None, True, 500, _CITY_PREP),
    BenchmarkSpec("ade", "ADE", "ade20k", 150, False, True, ("ade/ADEChallengeData2016",), "images/validation",
                  "annotations/validation", ".jpg", ".png", None, False, 2000, _ADE_PREP),
)}
BENCHMARK_NAMES = tuple(BENCHMARKS)

#: other spellings accepted for a benchmark (the official config names and common ones)
_ALIASES = {s.config: s.name for s in BENCHMARKS.values()} | {
    "context60": "pc60", "context59": "pc59", "coco_object": "object", "coco-object": "object", "coco_stuff": "stuff",
    "coco-stuff": "stuff", "cityscapes": "city", "ade20k": "ade", "voc": "voc21",
}


class LayoutError(FileNotFoundError):
    """A benchmark layout is missing or incomplete; the message says what, where, and how to make it."""


def get_spec(name: str) -> BenchmarkSpec:
    """The benchmark called ``name`` (``voc21``, ``pc60`` ... or an official config name such as ``context60``)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARK_NAMES)}")
    return BENCHMARKS[key]


def names_file(spec: Union[str, BenchmarkSpec], method: Optional[str] = None) -> Path:
    """The official name set (``cls_<config>.txt``) of a benchmark, as ``method``'s harness reads it.

    A method whose repository names the classes differently has its own file (``names/<method>/``);
    every other method reads the SCLIP / NACLIP file.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    folder = resources.files("tag2mask.bench") / "names"
    own = folder / str(method or "") / f"cls_{spec.config}.txt"
    chosen = own if method and own.is_file() else folder / f"cls_{spec.config}.txt"
    return Path(str(chosen))


def reduce_zero_label(gt: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: ``(H, W)`` uint8 -> ``(H, W)`` uint8 with 0 -> 255, others minus one."""
    out = gt.astype(np.int16) - 1
    out[(gt == 0) | (gt == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


def read_ground_truth(path: Union[str, os.PathLike], spec: BenchmarkSpec,
                      num_classes: Optional[int] = None) -> np.ndarray:
    """One label map as it is scored: ``(H, W)`` uint8, values ``0..num_classes-1`` or 255 (ignored).

    Palette PNGs (VOC) are read by index, not colour; after ``reduce_zero_label`` values ``>= num_classes``
    (default ``spec.num_classes``; a replaced name set brings its own count) become 255.
    """
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: ground truth must be a single-channel label PNG, got mode {img.mode}")
        gt = np.asarray(img)
    if gt.dtype != np.uint8:
        if gt.min() < 0 or gt.max() > 255:
            raise ValueError(f"{path}: label values outside 0..255")
        gt = gt.astype(np.uint8)
    if spec.reduce_zero_label:
        gt = reduce_zero_label(gt)
    gt = gt.copy()
    gt[gt >= (spec.num_classes if num_classes is None else num_classes)] = IGNORE_INDEX
    return gt


@dataclass(frozen=True)
class BenchmarkItem:
    """One validation image: ``key`` (stem, ``city/stem`` on Cityscapes) names its outputs."""

    key: str
    image: Path
    gt: Path


@dataclass(frozen=True)
class BenchmarkDataset:
    """A benchmark found on disk: its spec, the layout folder and its items (sorted by key)."""

    spec: BenchmarkSpec
    root: Path
    items: tuple[BenchmarkItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    def ground_truth(self, item: BenchmarkItem) -> np.ndarray:
        """``(H, W)`` uint8 ground truth of ``item`` as scored (:func:`read_ground_truth`)."""
        return read_ground_truth(item.gt, self.spec)


def _hint(spec: BenchmarkSpec) -> str:
    return f"prepare it with {spec.prepare}, or pass {spec.option} PATH if it lives elsewhere"


def _find_root(spec: BenchmarkSpec, data: Optional[Path], override: Optional[Path]) -> Path:
    if override is not None:
        if not override.is_dir():
            raise LayoutError(f"{spec.title}: {spec.option} {override} is not a folder")
        return override
    if data is None:
        raise LayoutError(f"{spec.title}: no --data ROOT and no {spec.option} PATH given")
    candidates = [data / f for f in spec.folders]
    for c in candidates:
        # COCO-Object may share COCO-Stuff's folder: the first candidate holding its annotation files wins
        if (c / spec.gt_dir).is_dir() and (len(candidates) == 1 or _has_gt_files(c, spec)):
            return c
    looked = " and ".join(str(c) for c in candidates)
    raise LayoutError(f"{spec.title}: no layout at {looked} (need {spec.image_dir}/ and {spec.gt_dir}/"
                      f"*{spec.gt_suffix}); {_hint(spec)}")


def _has_gt_files(folder: Path, spec: BenchmarkSpec) -> bool:
    gt_dir = folder / spec.gt_dir
    return any(name.endswith(spec.gt_suffix) for name in os.listdir(gt_dir))


def _listed_keys(root: Path, spec: BenchmarkSpec) -> list[str]:
    """The item keys: the split file's stems, or the images found in ``image_dir``."""
    if spec.split_file is not None:
        split = root / spec.split_file
        if not split.is_file():
            raise LayoutError(f"{spec.title}: split file {split} is missing; {_hint(spec)}")
        keys = [line.strip() for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not keys:
            raise LayoutError(f"{spec.title}: split file {split} lists no images")
        return keys
    image_dir = root / spec.image_dir
    if not image_dir.is_dir():
        raise LayoutError(f"{spec.title}: image folder {image_dir} is missing; {_hint(spec)}")
    pattern = f"*/*{spec.image_suffix}" if spec.recursive else f"*{spec.image_suffix}"
    keys = sorted(p.relative_to(image_dir).as_posix()[: -len(spec.image_suffix)] for p in image_dir.glob(pattern))
    if not keys:
        raise LayoutError(f"{spec.title}: no *{spec.image_suffix} images in {image_dir}; {_hint(spec)}")
    return keys


def open_benchmark(name: Union[str, BenchmarkSpec], data: Union[str, os.PathLike, None] = None,
                   override: Union[str, os.PathLike, None] = None) -> BenchmarkDataset:
    """Find benchmark ``name`` under ``data`` (mmseg's ``data/`` folder) or at ``override``.

    Raises:
        LayoutError: a folder, the split file, or images / ground truths of listed items are missing;
            the message names what is missing (count and first examples), where, and the mmseg tool
            that makes the layout.
    """
    spec = get_spec(name) if isinstance(name, str) else name
    root = _find_root(spec, Path(data) if data is not None else None, Path(override) if override is not None else None)
    for sub in (spec.image_dir, spec.gt_dir):
        if not (root / sub).is_dir():
            raise LayoutError(f"{spec.title}: {root / sub} is missing; {_hint(spec)}")
    items, missing = [], []
    for key in _listed_keys(root, spec):
        image = root / spec.image_dir / f"{key}{spec.image_suffix}"
        # Cityscapes: <city>/<id>_leftImg8bit.png pairs with <city>/<id>_gtFine_labelTrainIds.png
        gt = root / spec.gt_dir / f"{key}{spec.gt_suffix}"
        for path in (image, gt):
            if not path.is_file():
                missing.append(path)
        items.append(BenchmarkItem(key, image, gt))
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise LayoutError(f"{spec.title}: layout at {root} is incomplete: {len(missing)} file(s) missing, e.g. "
                          f"{shown}; {_hint(spec)}")
    return BenchmarkDataset(spec, root, tuple(sorted(items, key=lambda it: it.key)))


def open_benchmarks(names: Sequence[str], data: Union[str, os.PathLike, None],
                    overrides: Mapping[str, Union[str, os.PathLike, None]]) -> list[BenchmarkDataset]:
    """:func:`open_benchmark` for each name (``overrides``: benchmark name -> folder); every problem at once."""
    found, problems = [], []
    for name in names:
        spec = get_spec(name)
        try:
            found.append(open_benchmark(spec, data, overrides.get(spec.name)))
        except LayoutError as exc:
            problems.append(str(exc))
    if problems:
        raise LayoutError("\n".join(problems))
    return found
