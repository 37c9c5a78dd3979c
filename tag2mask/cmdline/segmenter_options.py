"""Command-line pieces of every segmenter-training command (``train segmenter``, its recipes' own options,
``train clip-zss``): network options, class names, recipe overrides, the training / validation data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["SPLITS", "parse_model_option", "resolve_class_names", "network_options", "recipe_overrides",
           "open_train_val"]

#: default (train split, validation split) per data set kind
SPLITS = {"voc": ("train_aug", "val"), "coco": ("train", "val"), "folder": (None, None)}


def parse_model_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--model-option {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def resolve_class_names(spec: Optional[str], masks: Optional[str], kind: str, data: Optional[str] = None) -> list[str]:
    """Foreground class names from ``--classes``, the label run in ``--masks`` or the data set kind
    (a ``synth export`` folder in ``data``: the synthetic classes)."""
    from tag2mask.cmdline.classes import resolve_classes
    from tag2mask.data.segmentation import pseudo_label_classes
    from tag2mask.synth.export import export_splits

    if spec is None:
        recorded = pseudo_label_classes(masks) if masks else None
        if recorded:
            return recorded
        if kind == "voc" and data is not None and export_splits(data) is not None:
            spec = "synth"
        elif kind in ("voc", "coco"):
            spec = kind
        else:
            raise ValueError("--classes is needed (voc, coco, synth, a file or 'a, b, c'): the masks do not name "
                             "their classes")
    if spec.lower() in ("voc", "coco", "synth") or Path(spec).is_file():
        names = resolve_classes(spec)
        return names[1:] if names and names[0].lower() == "background" else names
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--classes {spec!r}: no class names")
    return names


def network_options(args: argparse.Namespace, network: str, teacher_clip: bool = False) -> dict[str, Any]:
    """``--model-option`` values plus what --pretrained / --backbone-pretrained / --weights fill in."""
    options = dict(parse_model_option(o) for o in args.model_option)
    if args.pretrained is not None:
        if network == "clip-decoder":
            raise ValueError("--pretrained does not apply to clip-decoder (its backbone is the CLIP of --weights)")
        options["pretrained"] = args.pretrained
    if args.backbone_pretrained is not None:
        if network not in ("upernet", "mask2former"):
            raise ValueError(f"--backbone-pretrained applies to upernet and mask2former, not {network}")
        options["backbone_pretrained"] = args.backbone_pretrained
    if args.weights is not None and not teacher_clip:
        if network != "clip-decoder":
            raise ValueError(f"--weights (CLIP weights) applies to clip-decoder only, not {network}")
        options["clip_weights"] = args.weights
    if network == "clip-decoder" and "clip_weights" not in options and not teacher_clip:
        from tag2mask.cmdline.options import shipped_weights_path

        options["clip_weights"] = str(shipped_weights_path())
    return options


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key, value in (("max_iters", args.iters), ("batch_size", args.batch_size), ("crop_size", args.crop),
                       ("lr", args.lr), ("optimizer", args.optimizer)):
        if value is not None:
            overrides[key] = value
    return overrides


def open_train_val(args: argparse.Namespace, kind: str, num_classes: int, splits: tuple[Optional[str], Optional[str]],
                   with_masks: bool = True):
    """``(train source, validation source or None)`` from ``--data/--masks/--train-split/--val-*``.

    ``splits``: the default (train, validation) split names of the data set kind. ``with_masks=False``:
    the training side is images only (a teacher labels them).
    """
    from tag2mask.data.datasets import detect_dataset
    from tag2mask.data.segmentation import open_segmentation_data, open_unlabeled_images

    train_split, val_split = splits
    if args.train_split is not None:
        if kind == "folder":
            raise ValueError("--train-split applies to VOC/COCO roots, not to an image folder")
        train_split = args.train_split
    if with_masks:
        train_source = open_segmentation_data(args.data, train_split, args.masks, num_classes)
    else:
        train_source = open_unlabeled_images(args.data, train_split)

    val_data = args.val_data or (args.data if kind in ("voc", "coco") else None)
    validates = args.val_every or not getattr(args, "no_eval", False)
    if val_split is None and args.val_data is None and args.val_split is None and val_data is not None and validates:
        # a root without a val split (an export written without --val): validate on the training
        # images, and say so, rather than on an unnamed split ("VOC None")
        val_split = train_split
        print(f"warning: {args.data} has no val split: validating on its training images ({train_split}), so the "
              "scores are not held out; pass --val-data/--val-split, or --val-split none to skip validation",
              file=sys.stderr)
    if args.val_split is not None:
        val_split = None if args.val_split.lower() == "none" else args.val_split
        if val_split is None:
            val_data = None
    if args.val_masks is not None and val_data is None:
        raise ValueError("--val-masks needs --val-data (the images they belong to)")
    val_source = None
    if val_data is not None:
        val_kind = detect_dataset(val_data)
        val_source = open_segmentation_data(val_data, val_split if val_kind in ("voc", "coco") else None,
                                            args.val_masks, num_classes)
    elif args.val_every:
        raise ValueError("--val-every needs a validation set (--val-data / --val-split)")
    return train_source, val_source
