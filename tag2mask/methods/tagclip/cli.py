"""``tag2mask tag``: image-level tags for a folder of images with TagCLIP (no annotation, no training).

Outputs in ``--out``: ``scores/<image>.json`` per image (scores, tags, CWR decisions), then over all
finished images ``tags.json`` (the label file of ``tag2mask label --labels``), ``tagclip.txt`` (the
official ``<image id> <class id> ...`` lines), ``scores.csv`` and, with ``--gt``, ``metrics.json``.
Resumable like every batch job (manifest.jsonl, ``--resume``).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any, Optional

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    """Register ``tag`` on the top-level sub-command parser."""
    from tag2mask.cmdline.options import add_device_option, add_run_options, add_weights_options, record_given_options

    p = subparsers.add_parser(
        "tag",
        help="image-level tags of every image with TagCLIP (training-free multi-label classification)",
        description=(
            "Predict the classes present in each image with TagCLIP (AAAI 2024) on a frozen CLIP: coarse "
            "patch scores, attention-vote and class-box masking, class-wise re-identification of each "
            "candidate's crop. Writes tags.json (read by 'tag2mask label --labels'), the official "
            "tagclip.txt lines, scores.csv and, with --gt, the classification metrics."
        ),
        epilog=(
            "examples:\n"
            "  tag2mask tag photos/ --classes voc --weights ViT-B-16.pt --out tags1\n"
            "  tag2mask tag VOC2007/JPEGImages --classes voc --gt test_cls.txt --compat --weights ViT-B-16.pt --out t\n"
            "  tag2mask label photos/ --labels tags1/tags.json --classes voc --out masks1\n"
            "--gt: a JSON/CSV label file (class names) or official '<image id> <class id> ...' lines (0-based ids;\n"
            "      COCO-Stuff: ids of the 182-class space, as the official split files).\n"
            "exit code: 0 all images ok, 1 some failed (listed in OUT/manifest.jsonl), 2 bad arguments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", help="a folder of images (searched recursively)")
    p.add_argument("--classes", default="voc", help="voc, coco, cocostuff, synth (each with its official TagCLIP "
                   "settings), a name-set file or an inline list 'cat, dog; background: sky' (voc settings) (default: voc)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--gt", default=None, help="ground-truth tags for the metrics (see below)")
    p.add_argument("--compat", action="store_true", help="reproduce the official code's bugs too (clipped box ends, "
                   "early exit of re-identification); default: corrected (docs/tagclip.md)")
    p.add_argument("--no-cwr", dest="cwr", action="store_false", help="skip class-wise re-identification (local scores only)")
    p.add_argument("--save-arrays", action="store_true", help="also save every intermediate (arrays/<image>.npz)")
    add_weights_options(p)
    add_device_option(p)
    add_run_options(p)
    p.set_defaults(func=run)
    record_given_options(p)


def run(args: argparse.Namespace) -> int:
    """Run ``tag2mask tag``; returns the exit code."""
    from dataclasses import replace

    import torch

    from tag2mask.version import __version__
    from tag2mask.cmdline.options import toy_model_warning
    from tag2mask.data.datasets import FolderDataset
    from tag2mask.jobs.distributed import device_for_rank
    from tag2mask.jobs.runner import JobOptions, print_summary, process_exit_code, run_items
    from tag2mask.methods.tagclip.job import finalize_tags, item_source, load_tagger, tag_item_fn
    from tag2mask.methods.tagclip.presets import config_for_classes

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    preset, config = config_for_classes(args.classes, compat=args.compat)
    config = replace(config, cwr=args.cwr)
    items = FolderDataset(args.images)
    if not len(items):
        raise FileNotFoundError(f"{args.images}: no image files in this folder")
    if args.gt is not None and not Path(args.gt).is_file():
        raise FileNotFoundError(f"--gt file not found: {args.gt}")
    args.device = device_for_rank(args.device)
    model, tagger = load_tagger(args, config)
    warning = toy_model_warning(model, [args.images])
    out = Path(args.out)
    settings = {"command": "tag", "classes": args.classes, "preset": preset, "compat": args.compat, "cwr": args.cwr,
                "save_arrays": args.save_arrays, "weights": model.fingerprint}
    used = {"attn_mean_blocks_used": list(tagger.mean_layers)}  # differs from the preset for a non-12-block ViT
    record = {"tag2mask": __version__, "torch": torch.__version__, "python": platform.python_version(),
              "command": "tag", "settings": settings, "tagclip": config.to_dict() | used,
              "classes": list(config.class_names),
              "weights": getattr(model, "source_path", None), "device": str(tagger.device),
              "warnings": [warning] if warning else []}
    result: dict[str, Any] = {}
    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="tag", unit="img")
    summary = run_items(items, tag_item_fn(tagger, items, out, args.save_arrays), out, settings, options,
                        keys=items.names, run_record=record,
                        finalize=lambda d, s: finalize_tags(d, items, config, preset, args.gt, result),
                        source_of=lambda i: item_source(items, i))
    if not args.quiet or summary.failed:
        print_summary(summary, out, "tag")
        _print_metrics(result.get("metrics"))
    return process_exit_code(summary)


def _print_metrics(metrics: Optional[dict]) -> None:
    if not metrics:
        return

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}"

    f1 = metrics["F1_overall_official"]
    print(f"tag: {metrics['images']} images with ground truth: mAP {pct(metrics['mAP'])} "
          f"(classes with positives: {metrics['classes_with_positives']}), official mAP {pct(metrics['mAP_official'])}, "
          f"official overall F1 {pct(f1['f1'])} (P {pct(f1['p'])}, R {pct(f1['r'])})")
