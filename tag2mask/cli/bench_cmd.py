"""``tag2mask bench``: every open-vocabulary method on the 8 standard benchmarks, the papers' table in one command."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from tag2mask.cmdline.options import (
    add_device_option,
    add_overlap_options,
    add_run_options,
    add_weights_options,
    check_overlap_options,
    record_given_options,
)
from tag2mask.cmdline.option_types import non_negative_int
from tag2mask.methods import registry

# kept in step with tag2mask.bench.datasets.BENCHMARK_NAMES (importing it here would load NumPy for every --help)
BENCHMARK_CHOICES = ("voc21", "pc60", "object", "voc20", "pc59", "stuff", "city", "ade")
LAYOUTS = """layouts under --data ROOT (mmseg's data/ folder; prepared with mmseg's tools):
  voc21, voc20  VOCdevkit/VOC2012: JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt
  pc60, pc59    VOCdevkit/VOC2010: JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt
  object        coco_object (or coco_stuff164k): images/val2017, annotations/val2017/*_instanceTrainIds.png
                (datasets/cvt_coco_object.py of SCLIP / NACLIP)
  stuff         coco_stuff164k: images/val2017, annotations/val2017/*_labelTrainIds.png
  city          cityscapes: leftImg8bit/val/*/, gtFine/val/*/*_gtFine_labelTrainIds.png
  ade           ade/ADEChallengeData2016: images/validation, annotations/validation (reduce-zero-label)
protocol: mIoU over the dataset's classes (mmseg: classes present in the ground truth or the prediction),
ground truth 255 ignored; VOC21, PC60, Object score background as class 0; VOC20, PC59, ADE ignore
ground-truth 0 and shift the rest down by one."""


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="run the open-vocabulary methods on the 8 standard benchmarks and write the papers' table",
        description=(
            "For each (benchmark, method): segment the validation images with the method's published settings "
            "for that benchmark, score them as the papers do, and write OUT/results.json, results.csv, results.md "
            "(methods x benchmarks + average) and index.html (table, bar chart, overlays). Each cell is a batch job "
            "in OUT/cells/BENCHMARK/METHOD: --resume continues per image, torchrun shards it (docs/bench.md)."
        ),
        epilog=(
            "examples:\n"
            "  tag2mask bench --data data --weights ViT-B-16.pt --out bench\n"
            "  tag2mask bench --data data --datasets voc21,ade --methods sclip,naclip --limit 50 --out quick\n"
            "  torchrun --nproc-per-node 4 -m tag2mask bench --data data --weights ViT-B-16.pt --out bench\n"
            + LAYOUTS + "\n"
            "exit code: 0 every image scored, 1 some images failed (listed per cell), 2 bad arguments or layouts"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=None, help="mmseg's data/ folder holding the layouts listed below")
    for name in BENCHMARK_CHOICES:
        p.add_argument(f"--data-{name}", default=None, metavar="PATH", help=f"the {name} layout folder itself, if elsewhere")
    for name in BENCHMARK_CHOICES:
        p.add_argument(f"--names-{name}", default=None, metavar="FILE",
                       help=f"score {name} with this name set instead of the official cls_*.txt (its own class count)")
    p.add_argument("--datasets", default=",".join(BENCHMARK_CHOICES),
                   help=f"comma-separated benchmarks (when not given, all 8: {','.join(BENCHMARK_CHOICES)})")
    p.add_argument("--methods", default="all",
                   help="m1,m2 or all (default: all = every training-free names->masks method of the registry: "
                        f"{', '.join(registry.bench_methods())}); a method whose predictor needs inputs the "
                        "bench does not have (e.g. a DINO and regions) is reported as skipped, with the reason")
    p.add_argument("--preset", default="published", choices=("published", "default"),
                   help="published (default): each method's official settings for each benchmark (published:DATASET); "
                        "default: tag2mask's default preset everywhere")
    p.add_argument("--out", required=True, help="output folder (results.*, index.html, cells/, overlays/)")
    p.add_argument("--overlays", type=non_negative_int(note="0 writes no overlays"), default=3,
                   help="overlays of the first N images of each benchmark (default 3; 0: none)")
    add_weights_options(p)
    add_device_option(p)
    add_run_options(p)
    add_overlap_options(p, "decode images and ground truths, write and score predictions")
    p.set_defaults(func=run)
    record_given_options(p)
    return p


def _overrides(args: argparse.Namespace, kind: str) -> dict[str, str]:
    return {n: getattr(args, f"{kind}_{n}") for n in BENCHMARK_CHOICES if getattr(args, f"{kind}_{n}") is not None}


def _check(args: argparse.Namespace, datasets: list[str]) -> None:
    from tag2mask.cmdline.options import check_weights_options, reject_options

    check_weights_options(args)
    check_overlap_options(args)
    unused = [n for n in BENCHMARK_CHOICES if n not in datasets]
    reject_options(args, [f"{kind}_{n}" for n in unused for kind in ("data", "names")],
                   f"to benchmarks not in --datasets ({','.join(datasets)})")


def run(args: argparse.Namespace) -> int:
    import torch

    from tag2mask.version import __version__
    from tag2mask.bench.datasets import LayoutError, get_spec, open_benchmarks
    from tag2mask.bench.harness import BenchOptions
    from tag2mask.bench.runner import plan_cells, run_bench
    from tag2mask.cli.bench_methods import RegistryMethods, select_methods
    from tag2mask.cmdline.options import load_model_from_args, overlap_settings, toy_model_warning
    from tag2mask.jobs.distributed import device_for_rank
    from tag2mask.jobs.runner import JobSummary, process_exit_code

    datasets = list(dict.fromkeys(get_spec(d).name for d in args.datasets.split(",") if d.strip()))
    if not datasets:
        raise ValueError("--datasets is empty")
    _check(args, datasets)
    methods = select_methods(args.methods)
    try:  # every layout problem at once, before the model is loaded
        found = open_benchmarks(datasets, args.data, _overrides(args, "data"))
    except LayoutError as exc:
        raise LayoutError(f"{exc}\n(to bench only the layouts you have, name them: --datasets voc21,ade,...)") from None
    out = Path(args.out)
    source = RegistryMethods(args.preset)
    cells = plan_cells(found, methods, source, out, _overrides(args, "names"))
    args.device = device_for_rank(args.device)
    model = source.model = load_model_from_args(args)
    warning = toy_model_warning(model, [str(ds.root) for ds in found])
    workers, batch = overlap_settings(args, next(model.parameters()).device)
    options = BenchOptions(preset=args.preset, limit=args.limit, overlays=args.overlays, resume=args.resume,
                           overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose, workers=workers,
                           batch_size=batch)
    record = {"tag2mask": __version__, "torch": torch.__version__, "python": platform.python_version(),
              "command": "bench", "preset": args.preset, "weights": args.weights or "shipped tiny CLIP",
              "weights_fingerprint": getattr(model, "fingerprint", None), "device": str(next(model.parameters()).device),
              "workers": workers, "batch_size": batch, "warnings": [warning] if warning else []}
    results = run_bench(cells, source, options, out, record)
    if not args.quiet:
        from tag2mask.bench.report import markdown_table
        from tag2mask.jobs.distributed import dist_info

        if dist_info().is_main:
            print(markdown_table(results))
    return process_exit_code(JobSummary(failed=sum(r["failed"] for r in results)))
