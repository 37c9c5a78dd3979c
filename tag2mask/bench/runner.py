"""``run_bench``: plan the (benchmark, method) cells, run each as a batch job, write the reports.

The harness knows no method: the caller hands it a :class:`MethodSource` (``tag2mask bench`` builds one
from the method registry, :mod:`tag2mask.cli.bench_methods`) that says how each method runs on each
benchmark (:class:`~tag2mask.bench.harness.MethodPlan`) and builds its predictor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

from tag2mask.bench.datasets import BenchmarkDataset, names_file
from tag2mask.bench.harness import BenchOptions, Cell, MethodPlan, cell_dir, run_cell

__all__ = ["MethodSource", "plan_cells", "run_bench"]


class MethodSource(Protocol):
    """What the harness needs from the methods."""

    #: the loaded model's fingerprint (recorded in every cell's settings guard)
    fingerprint: Optional[str]

    def plan(self, method: str, config: str) -> MethodPlan:
        """How ``method`` runs on the benchmark whose official config is ``config`` (e.g. ``voc21``)."""

    def unsupported(self, plan: MethodPlan) -> Optional[str]:
        """Why the loaded model cannot run ``plan.method`` (the cell is then skipped with it), or ``None``."""

    def build(self, plan: MethodPlan, vocab: Any) -> Any:
        """A predictor for ``plan``: ``predict(PIL image)`` -> result with ``.label`` ``(H, W)`` uint8 in
        the benchmark's values (with a background class 0 is background and the classes are 1..K, otherwise
        0..K-1)."""


def plan_cells(datasets: Sequence[BenchmarkDataset], methods: Sequence[str], source: MethodSource, out: Path,
               names_overrides: Optional[Mapping[str, "str | os.PathLike"]] = None) -> list[Cell]:
    """One :class:`Cell` per (benchmark, method), benchmarks in the given order, methods inside; each
    with ``source``'s plan of the method on that benchmark (a method to skip gets a cell too).

    Each method reads the official name set its harness uses (:func:`names_file`) unless
    ``names_overrides`` replaces it for that benchmark; a replaced set brings its own class count.
    """
    from tag2mask.vocab.vocabulary import load_vocabulary

    overrides = dict(names_overrides or {})
    cells = []
    for ds in datasets:
        spec = ds.spec
        for method in methods:
            replaced = overrides.get(spec.name)
            path = Path(replaced) if replaced is not None else names_file(spec, method)
            vocab = load_vocabulary(str(path), first_line_background=spec.has_background)
            cell = Cell(ds, method, path, "replaced" if replaced is not None else "official", vocab,
                        cell_dir(out, spec.name, method), source.plan(method, spec.config))
            if replaced is None and cell.num_classes != spec.num_classes:
                raise ValueError(f"{path}: {cell.num_classes} classes, {spec.title} has {spec.num_classes}")
            cells.append(cell)
    return cells


def run_bench(cells: Sequence[Cell], source: MethodSource, options: BenchOptions, out: Path,
              record: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every cell (resuming per image with ``options.resume``) and write ``out``'s reports on rank 0.

    ``source`` builds the methods; ``record`` holds run-wide fields (versions, weights, warnings) for
    ``results.json``. A cell whose plan says skip is not run: its result has ``status`` ``skipped`` and the
    reason. Returns one result dict per cell.
    """
    from tag2mask.bench.report import write_reports
    from tag2mask.jobs import distributed as D

    # one process group for every cell (each cell's job would otherwise create and destroy its own)
    created = D.init_distributed()
    try:
        results = [_run_one(cell, source, options, out) for cell in cells]
        error = None
        if D.dist_info().is_main:
            try:
                write_reports(out, cells, results, record, options)
            except Exception as exc:  # re-raised below; the other ranks must not wait for rank 0 forever
                error = exc
        failed = D.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")[0]
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"rank 0 failed to write the reports: {failed}")
    finally:
        D.shutdown(created)
    return results


def _run_one(cell: Cell, source: MethodSource, options: BenchOptions, out: Path) -> dict[str, Any]:
    """Run one cell and return its result row (score + where it comes from)."""
    row = {
        "dataset": cell.spec.name, "title": cell.spec.title, "method": cell.method, "preset": cell.plan.preset,
        "num_classes": cell.num_classes, "class_names": cell.class_names, "names": str(cell.names),
        "names_source": cell.names_source, "layout": str(cell.dataset.root), "available": len(cell.dataset),
        "full_val_set": cell.spec.val_images, "cell": cell.out.relative_to(out).as_posix(),
    }
    skip = cell.plan.skip if cell.plan.skip is not None else source.unsupported(cell.plan)
    if skip is not None:
        return {**row, "status": "skipped", "skip_reason": skip, **SKIPPED_SCORE}
    score = run_cell(cell, lambda: source.build(cell.plan, cell.vocab), options, source.fingerprint)
    return {**row, "status": "ran", **score}


#: the score fields of a skipped cell: nothing ran, nothing scored (its reason is in ``skip_reason``)
SKIPPED_SCORE: dict[str, Any] = {"miou": None, "pixel_accuracy": None, "mean_accuracy": None, "class_iou": [],
                                 "miou_rule": None, "images": 0, "failed": 0, "failures": [], "pixels": 0,
                                 "written": 0, "skipped": 0, "seconds": 0.0}
