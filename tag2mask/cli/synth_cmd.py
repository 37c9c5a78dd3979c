"""``tag2mask synth ...``: synthetic-world utilities (currently ``synth export`` to a VOC-layout folder)."""

from __future__ import annotations

import argparse
from tag2mask.cmdline import option_types as ot
import sys


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Register ``synth`` (with nested ``export``) on ``subparsers``; returns the ``synth`` parser."""
    parser = subparsers.add_parser(
        "synth",
        help="generate the procedural synthetic world (shapes on textures) with exact masks",
        description="Procedural synthetic world: object shapes on stuff textures, VOC-style ground truth.",
    )
    parser.set_defaults(func=_no_action, _synth_parser=parser)
    sub = parser.add_subparsers(dest="synth_command", metavar="SYNTH_COMMAND")

    exp = sub.add_parser(
        "export",
        help="write train/val(/test) splits in VOC layout",
        description="Write synthetic splits in VOC layout (JPEGImages/*.png, SegmentationClass, Annotations, "
        "ImageSets/Segmentation, labels.json, captions.jsonl, classes.txt, README.txt).",
    )
    exp.add_argument("--out", required=True, help="output directory (created if missing)")
    exp.add_argument("--n", type=ot.positive_int(1_000_000), required=True, help="number of train images")
    exp.add_argument("--val", type=ot.non_negative_int(1_000_000), default=0, help="number of val images (default 0)")
    exp.add_argument("--test", type=ot.non_negative_int(1_000_000), default=0, help="number of test images (default 0)")
    exp.add_argument("--size", type=ot.int_in(16, ot.MAX_SIDE), default=224, help="image side in pixels (default 224)")
    exp.add_argument("--seed", type=ot.non_negative_int(2**32 - 1), default=0, help="base seed; splits stay disjoint for any seed (default 0)")
    exp.add_argument("--no-void", action="store_true", help="do not write the 1-px 255 outline into masks")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=run)
    return parser


def _no_action(args: argparse.Namespace) -> int:
    args._synth_parser.print_help()
    return 2


def run(args: argparse.Namespace) -> int:
    """Execute ``synth export``; returns the process exit code."""
    from tqdm import tqdm

    from tag2mask.synth.export import export_voc

    for name in ("n", "val", "test"):
        if getattr(args, name) < 0:
            print(f"error: --{name} must be >= 0", file=sys.stderr)
            return 2
    if args.size < 16:
        print("error: --size must be >= 16", file=sys.stderr)
        return 2
    splits = {"train": args.n}
    if args.val:
        splits["val"] = args.val
    if args.test:
        splits["test"] = args.test
    total = sum(splits.values())
    with tqdm(total=total, desc="synth export", unit="img", disable=args.quiet) as bar:
        try:
            written = export_voc(args.out, splits, size=args.size, seed=args.seed,
                                 void_outline=not args.no_void, progress=bar.update)
        except ValueError as exc:  # e.g. seed range that would make splits overlap
            print(f"error: {exc}", file=sys.stderr)
            return 2
    summary = ", ".join(f"{k}: {len(v)}" for k, v in written.items())
    print(f"wrote {total} images to {args.out} ({summary})")
    return 0
