"""The bench harness: one batch job per (benchmark, method) cell, scored with the papers' protocol.

Each cell is a :func:`~tag2mask.jobs.runner.run_items` job in ``OUT/cells/<benchmark>/<method>/`` whose
items are the benchmark's validation images, so a cell has everything the batch jobs have: atomic
outputs, a manifest, ``--resume`` per image (a finished cell only re-verifies its files; the method
is not even built), the settings guard, per-image error records and torchrun sharding. Per image the
work is split into :class:`~tag2mask.jobs.overlap.Stages`: decoding the image and its ground truth
(``prepare``) and writing + scoring the prediction (``finish``) run in worker processes while this
process runs the method (``compute``).

Outputs per image: ``pred/<key>.png`` (the label map, in the benchmark's label values) and
``confusion/<key>.npz`` (its confusion matrix against the ground truth, sparse: ``rows``, ``cols``,
``counts`` int64), plus ``overlays/<key>.png`` for the first ``overlays`` images. Scoring sums the
confusion matrices of the images of this run (the first ``limit``) -- integer sums, so the score is
the same whatever the order, the sharding or the interruptions -- and takes mmseg's mIoU: the mean
IoU over the classes present in the ground truth or the prediction (``gt_or_pred``); ground-truth
255 and values outside the class range are not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tag2mask.bench.datasets import BenchmarkDataset, BenchmarkItem, BenchmarkSpec, read_ground_truth

__all__ = ["BenchOptions", "MethodPlan", "Cell", "run_cell", "score_cell", "MIOU_RULE"]

#: mmseg's IoUMetric: nanmean over the classes whose union is not empty
MIOU_RULE = "gt_or_pred"
_PRELOAD = ("numpy", "PIL.Image", "tag2mask.bench.harness", "tag2mask.evaluation.miou", "tag2mask.io.visualize")


@dataclass
class BenchOptions:
    """The run options shared by every cell (``tag2mask bench``'s flags)."""

    preset: str = "published"
    limit: Optional[int] = None
    overlays: int = 3
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    verbose: bool = False
    workers: int = 0
    batch_size: int = 1


@dataclass(frozen=True)
class MethodPlan:
    """How one method runs on one benchmark, decided by the caller (the harness knows no method).

    Attributes:
        method: the method's name.
        preset: the preset name it runs with there (e.g. ``published:voc21``), ``None`` when skipped.
        settings: every setting that preset resolves to (recorded in the cell's settings guard and
            ``results.json``), ``None`` when the method cannot list them before it is built.
        skip: why the method cannot run in the bench (e.g. it needs inputs the bench cannot give),
            ``None`` when it runs. A skipped cell writes nothing and is reported with this reason.
    """

    method: str
    preset: Optional[str]
    settings: Optional[dict[str, Any]] = None
    skip: Optional[str] = None


@dataclass
class Cell:
    """One (benchmark, method) pair: the data, the name set, and where its job writes.

    Attributes:
        dataset: the benchmark found on disk.
        method: method name; ``names``: the name-set file; ``names_source``: ``official`` or ``replaced``.
        vocab: the name set read with the benchmark's background rule.
        out: ``OUT/cells/<benchmark>/<method>``.
        plan: the method's preset, settings or reason to skip on this benchmark.
    """

    dataset: BenchmarkDataset
    method: str
    names: Path
    names_source: str
    vocab: Any
    out: Path
    plan: MethodPlan

    @property
    def spec(self) -> BenchmarkSpec:
        return self.dataset.spec

    @property
    def num_classes(self) -> int:
        """Classes scored: the name set's classes, plus background where the benchmark has one."""
        return len(self.vocab.names) + int(self.spec.has_background)

    @property
    def class_names(self) -> list[str]:
        return (["background"] if self.spec.has_background else []) + list(self.vocab.names)


@dataclass
class _Prepared:
    key: str
    image: Any  # PIL RGB image
    gt: np.ndarray
    keep_rgb: bool


@dataclass
class _Computed:
    key: str
    label: np.ndarray
    gt: np.ndarray
    rgb: Optional[np.ndarray]


class PrepareItem:
    """Stage 1 (worker): decode one image and its ground truth as scored (:func:`read_ground_truth`).

    Pixels are used as stored (no EXIF rotation): the ground truth is drawn on the stored pixel grid.
    """

    def __init__(self, spec: BenchmarkSpec, num_classes: int, overlay_keys: Sequence[str]) -> None:
        self.spec, self.num_classes, self.overlay_keys = spec, num_classes, frozenset(overlay_keys)

    def __call__(self, item: BenchmarkItem) -> _Prepared:
        from PIL import Image

        from tag2mask.data.images import ImageDecodeError, to_rgb
        from tag2mask.jobs.runner import ItemError

        try:
            with Image.open(item.image) as img:
                img.load()  # decode while the file is open; to_rgb may return the image itself
                image = to_rgb(img)
        except (OSError, ValueError) as exc:
            raise ImageDecodeError(f"{item.image}: cannot decode ({exc})") from exc
        gt = read_ground_truth(item.gt, self.spec, self.num_classes)
        if gt.shape != (image.height, image.width):
            raise ItemError("size", f"{item.gt}: ground truth is {gt.shape[1]}x{gt.shape[0]}, the image "
                                    f"{item.image} is {image.width}x{image.height}")
        return _Prepared(item.key, image, gt, item.key in self.overlay_keys)


class ComputeLabels:
    """Stage 2 (this process): the method's label maps; the method is built on the first item it sees,
    so a cell whose images are all finished never loads it."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.segmenter: Any = None

    def __call__(self, batch: Sequence[_Prepared]) -> list[_Computed]:
        if self.segmenter is None:
            self.segmenter = self.factory()
        out = []
        for p in batch:
            label = np.asarray(self.segmenter.predict(p.image).label)
            out.append(_Computed(p.key, label, p.gt, np.asarray(p.image, dtype=np.uint8) if p.keep_rgb else None))
        return out


class FinishItem:
    """Stage 3 (worker): write the label map, its sparse confusion matrix and (first images) an overlay."""

    def __init__(self, out: Path, num_classes: int, class_names: Sequence[str], has_background: bool) -> None:
        self.out, self.num_classes = Path(out), num_classes
        self.class_names, self.has_background = list(class_names), has_background

    def __call__(self, c: _Computed) -> Any:
        from tag2mask.evaluation.miou import ConfusionMatrix
        from tag2mask.io.atomic import atomic_path
        from tag2mask.io.palette import save_label_png
        from tag2mask.jobs.runner import ItemError, ItemOutput

        if c.label.shape != c.gt.shape:
            raise ItemError("size", f"{c.key}: prediction {c.label.shape} and ground truth {c.gt.shape} differ")
        cm = ConfusionMatrix(self.num_classes)
        cm.update(c.label.astype(np.uint8), c.gt, name=c.key)
        rows, cols = np.nonzero(cm.mat)
        outputs = [self.out / "pred" / f"{c.key}.png", self.out / "confusion" / f"{c.key}.npz"]
        save_label_png(outputs[0], c.label)
        with atomic_path(outputs[1]) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, rows=rows.astype(np.int64), cols=cols.astype(np.int64), counts=cm.mat[rows, cols])
        if c.rgb is not None:
            outputs.append(self.out / "overlays" / f"{c.key}.png")
            save_overlay_for(outputs[-1], c.rgb, c.label, self.class_names, self.has_background)
        return ItemOutput([str(p) for p in outputs], {"pixels": int(cm.mat.sum())})


def save_overlay_for(path: Path, rgb: np.ndarray, label: np.ndarray, class_names: Sequence[str],
                     has_background: bool) -> None:
    """Overlay of a ``(H, W)`` label map in benchmark values (255 = ignore, left as the photo), with a
    legend strip naming the classes present."""
    from tag2mask.io.visualize import save_overlay

    if has_background:
        shown, names = label, list(class_names[1:])
    else:  # the overlay leaves 0 as the photo: shift so the first class is drawn too, keep 255
        shown = np.where(label == 255, 255, label.astype(np.int32) + 1).astype(np.uint8)
        names = list(class_names)
    save_overlay(path, rgb, shown, names)


def score_cell(cell_dir: Path, keys: Sequence[str], num_classes: int) -> dict[str, Any]:
    """Sum the confusion matrices of ``keys`` recorded ``ok`` in ``cell_dir``'s manifest; mIoU and counts."""
    from tag2mask.evaluation.miou import ConfusionMatrix
    from tag2mask.io.manifest import MANIFEST_NAME, latest_records

    records = latest_records([cell_dir / MANIFEST_NAME])
    cm = ConfusionMatrix(num_classes)
    scored, failed, failures = 0, 0, []
    for key in keys:
        rec = records.get(key)
        if rec is None or rec.get("status") != "ok":
            failed += 1
            if rec is not None and len(failures) < 20:
                failures.append({"item": key, "error": rec.get("error"), "error_kind": rec.get("error_kind")})
            continue
        with np.load(cell_dir / "confusion" / f"{key}.npz") as z:
            np.add.at(cm.mat, (z["rows"], z["cols"]), z["counts"])
        scored += 1
    s = cm.scores(MIOU_RULE)
    return {"miou": s["Mean IoU"], "pixel_accuracy": s["Pixel Accuracy"], "mean_accuracy": s["Mean Accuracy"],
            "class_iou": s["Class IoU"], "miou_rule": MIOU_RULE, "images": scored, "failed": failed,
            "failures": failures, "pixels": s["num_pixels"]}


def _cell_settings(cell: Cell, options: BenchOptions, fingerprint: Optional[str]) -> dict[str, Any]:
    """Everything that changes a cell's outputs (the settings guard compares them; ``--limit`` does not)."""
    vocab = cell.vocab
    return {
        "benchmark": cell.spec.name, "layout": str(cell.dataset.root), "method": cell.method,
        "preset": cell.plan.preset, "resolved": cell.plan.settings,
        "vocabulary": {"names": list(vocab.names), "synonyms": [list(x) for x in vocab.synonyms],
                       "background": list(vocab.background)},
        "num_classes": cell.num_classes, "weights": fingerprint, "overlays": options.overlays,
    }


def run_cell(cell: Cell, factory: Callable[[], Any], options: BenchOptions, fingerprint: Optional[str]) -> dict[str, Any]:
    """Run (or resume) one cell's job and return its score (rank 0 writes ``score.json``; every rank
    returns the same dict)."""
    from tag2mask.io.atomic import atomic_write_text
    from tag2mask.io.manifest import file_state
    from tag2mask.jobs.overlap import Stages
    from tag2mask.jobs.runner import JobOptions, run_items

    items = cell.dataset.items
    n = len(items) if options.limit is None else max(0, min(options.limit, len(items)))
    keys = [it.key for it in items]
    stages = Stages(PrepareItem(cell.spec, cell.num_classes, keys[: min(n, options.overlays)]),
                    ComputeLabels(factory),
                    FinishItem(cell.out, cell.num_classes, cell.class_names, cell.spec.has_background),
                    workers=options.workers, batch_size=options.batch_size, preload=_PRELOAD)
    job = JobOptions(resume=options.resume, overwrite=options.overwrite, quiet=options.quiet,
                     verbose=options.verbose, limit=options.limit, desc=f"{cell.spec.name}/{cell.method}", unit="img")
    holder: dict[str, Any] = {}

    def finalize(run_dir: Path, summary: Any) -> None:
        score = score_cell(run_dir, keys[:n], cell.num_classes)
        score.update(written=summary.written, skipped=summary.skipped, seconds=summary.seconds)
        holder["score"] = score
        atomic_write_text(run_dir / "score.json", json.dumps(score, indent=1))

    settings = _cell_settings(cell, options, fingerprint)
    run_items(items, stages, cell.out, settings, job, keys=keys, describe=lambda i: str(items[i].image),
              run_record={"command": "bench", "cell": [cell.spec.name, cell.method], "settings": settings},
              finalize=finalize, source_of=lambda i: {"image": file_state(items[i].image), "gt": file_state(items[i].gt)})
    if "score" in holder:
        return holder["score"]
    return json.loads((cell.out / "score.json").read_text(encoding="utf-8"))  # other ranks: rank 0's file


def cell_dir(out: Path, benchmark: str, method: str) -> Path:
    """``OUT/cells/<benchmark>/<method>``."""
    return Path(out) / "cells" / benchmark / method
