"""``run_bench``: plan the (benchmark, method) cells, run each as a batch job, write the reports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tag2mask.bench.datasets import BenchmarkDataset, names_file
from tag2mask.bench.harness import BenchOptions, Cell, cell_dir, run_cell

__all__ = ["select_methods", "plan_cells", "run_bench"]


def select_methods(spec: str) -> list[str]:
    """``all`` -> every method :func:`~tag2mask.bench.methods.bench_methods` lists; else ``m1,m2`` checked."""
    from tag2mask.bench.methods import bench_methods

    known = list(bench_methods())
    if spec.strip().lower() == "all":
        return known
    chosen = [m.strip().lower() for m in spec.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose 'all' or from {', '.join(known)}")
    return list(dict.fromkeys(chosen))


def plan_cells(datasets: Sequence[BenchmarkDataset], methods: Sequence[str], out: Path,
               names_overrides: Optional[Mapping[str, "str | os.PathLike"]] = None) -> list[Cell]:
    """One :class:`Cell` per (benchmark, method), benchmarks in the given order, methods inside.

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
                        cell_dir(out, spec.name, method))
            if replaced is None and cell.num_classes != spec.num_classes:
                raise ValueError(f"{path}: {cell.num_classes} classes, {spec.title} has {spec.num_classes}")
            cells.append(cell)
    return cells


def run_bench(cells: Sequence[Cell], models: Any, options: BenchOptions, out: Path,
              record: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every cell (resuming per image with ``options.resume``) and write ``out``'s reports on rank 0.

    ``models`` is a :class:`~tag2mask.bench.methods.ModelVariants`; ``record`` holds run-wide fields
    (versions, weights, warnings) for ``results.json``. Returns one result dict per cell.
    """
    from tag2mask.bench.report import write_reports
    from tag2mask.jobs import distributed as D

    # one process group for every cell (each cell's job would otherwise create and destroy its own)
    created = D.init_distributed()
    try:
        results = [_run_one(cell, models, options, out) for cell in cells]
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


def _run_one(cell: Cell, models: Any, options: BenchOptions, out: Path) -> dict[str, Any]:
    """Run one cell and return its result row (score + where it comes from)."""
    from tag2mask.bench.methods import build_segmenter, preset_name

    def factory() -> Any:
        return build_segmenter(cell.method, options.preset, cell.spec.config, cell.vocab, models)

    score = run_cell(cell, factory, options, models.fingerprint)
    return {
        "dataset": cell.spec.name, "title": cell.spec.title, "method": cell.method,
        "preset": preset_name(options.preset, cell.spec.config), "num_classes": cell.num_classes,
        "class_names": cell.class_names, "names": str(cell.names), "names_source": cell.names_source,
        "layout": str(cell.dataset.root), "available": len(cell.dataset), "full_val_set": cell.spec.val_images,
        "cell": cell.out.relative_to(out).as_posix(), **score,
    }
