"""Classify then segment: ``tag2mask label`` without tags (TagCLIP tags, then CLIP-ES), spec sections 1 and 6.

The label command calls :func:`prepare_auto_tags` first (a marked hook in ``tag2mask/cli/label_cmd.py``).
When tags are to be predicted it runs the TagCLIP job into ``OUT/tagclip/`` (resumable, its own
manifest), points ``--labels`` at the ``tags.json`` it wrote and returns what CLIP-ES changes in the
vendored copy of the official repository:

* the attention affinity averages blocks 5-11 (7 maps; CLIP-ES: 5-12) - :func:`affinity_blocks_5_to_11`;
* the dense CRF has no 0.95 confidence mask (``--confidence 0`` unless given);
* labels come from the tag file and the size from the decoded image (as ``label`` always does).

The tagger runs on its own unrounded copy of the weights; CLIP-ES then applies its official
numerics (fp16-rounded weights) to the model ``label`` loads, as the two official code bases do.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["add_label_options", "auto_tags_requested", "AutoTags", "prepare_auto_tags", "affinity_blocks_5_to_11"]

#: where the tag job of ``label`` writes, inside ``--out``
TAG_DIR = "tagclip"


def add_label_options(parser: argparse.ArgumentParser) -> None:
    """``--tags auto`` of ``tag2mask label``."""
    parser.add_argument(
        "--tags", default=None, choices=("auto",),
        help="auto: predict each image's tags with TagCLIP (tag2mask tag), then run CLIP-ES with the official "
        "annotation-free settings (affinity of blocks 5-11, no CRF confidence mask). Also chosen, with a notice, "
        "for a plain image folder given without --labels")


def affinity_blocks_5_to_11(maps):
    """``(n, L, L)`` maps ending with the last block's -> ``(hw, hw)`` mean of the 7 before it (CLS dropped).

    The vendored CLIP-ES of TagCLIP averages ``[-8:-1]`` of the 12 maps (spec 6.2).
    """
    from tag2mask.localization.affinity import mean_attention

    return mean_attention(maps[:-1], last=7)


def auto_tags_requested(args: argparse.Namespace) -> bool:
    """``--tags auto``, or a plain image folder without ``--labels`` (then a notice is printed)."""
    if getattr(args, "tags", None) == "auto":
        return True
    if args.labels is not None or getattr(args, "method", "clip-es") != "clip-es":
        return False
    from tag2mask.data.datasets import detect_dataset

    return detect_dataset(args.images) not in ("voc", "coco") and Path(args.images).is_dir()


@dataclass
class AutoTags:
    """What :func:`prepare_auto_tags` hands back to ``label``.

    affinity_fn: CLIP-ES's affinity replacement; settings: added to the run's settings (resume guard);
    record: added to ``run.json``; exit_code: 1 when the tag job failed on some images.
    """

    affinity_fn: Callable
    settings: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0


def _check(args: argparse.Namespace) -> None:
    from tag2mask.data.datasets import detect_dataset

    if args.method != "clip-es":
        raise ValueError("--tags auto needs --method clip-es (TagCLIP's tags feed CLIP-ES)")
    if args.labels is not None:
        raise ValueError("--tags auto predicts the tags: do not pass --labels as well")
    if detect_dataset(args.images) in ("voc", "coco"):
        raise ValueError(f"--tags auto takes an image folder; for a VOC or COCO root pass {Path(args.images) / 'JPEGImages'}")
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"image folder not found: {args.images}")


def prepare_auto_tags(args: argparse.Namespace) -> Optional[AutoTags]:
    """Run the TagCLIP job when tags are to be predicted; set ``args.labels`` (and ``args.confidence``)."""
    from tag2mask.cli.common import given
    from tag2mask.data.datasets import FolderDataset
    from tag2mask.jobs.runner import JobOptions, print_summary, run_items
    from tag2mask.methods.tagclip.cli import _finalize, _process, _source, load_tagger
    from tag2mask.methods.tagclip.presets import config_for_classes

    if not auto_tags_requested(args):
        return None
    _check(args)
    if getattr(args, "tags", None) != "auto" and not args.quiet:
        print("label: no --labels for an image folder: predicting tags with TagCLIP (--tags auto)", file=sys.stderr)
    preset, config = config_for_classes(args.classes, compat=args.compat)
    items = FolderDataset(args.images)
    if not len(items):
        raise FileNotFoundError(f"{args.images}: no image files in this folder")
    out = Path(args.out) / TAG_DIR
    _, tagger = load_tagger(args, config)
    settings = {"command": "tag", "classes": args.classes, "preset": preset, "compat": args.compat, "cwr": True,
                "save_arrays": False, "weights": tagger.model.fingerprint}
    result: dict[str, Any] = {}
    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="tag", unit="img")
    summary = run_items(items, _process(tagger, items, out, False), out, settings, options, keys=items.names,
                        run_record={"command": "tag", "settings": settings,
                                    "tagclip": config.to_dict() | {"attn_mean_blocks_used": list(tagger.mean_layers)}},
                        finalize=lambda d, s: _finalize(d, items, config, preset, None, result),
                        source_of=lambda i: _source(items, i))
    if summary.failed:
        print_summary(summary, out, "tag")
    del tagger  # the label stage loads the model with CLIP-ES's numerics
    args.labels = str(out / "tags.json")
    if args.refine == "crf" and not given(args, "confidence"):
        args.confidence = 0.0  # the vendored CLIP-ES's CRF has no confidence mask (spec 6.5)
    auto = {"tags": "auto", "affinity": "blocks 5-11 (TagCLIP's CLIP-ES)"}
    record = {"tags": {"source": "TagCLIP", "preset": preset, "tag_dir": TAG_DIR, "tagclip": config.to_dict(),
                       "confidence_mask": args.confidence if args.refine == "crf" else None}}
    return AutoTags(affinity_blocks_5_to_11, auto, record, 1 if summary.failed else 0)

