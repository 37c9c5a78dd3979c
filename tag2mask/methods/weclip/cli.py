"""``tag2mask train weclip``: train a WeCLIP decoder on online pseudo labels from image-level labels.

Examples::

    tag2mask train weclip --data synth --out runs/synth --iters 2000
    tag2mask train weclip --data VOCdevkit/VOC2012 --weights ViT-B-16.pt --out runs/voc --device cuda
    torchrun --nproc-per-node 2 -m tag2mask train weclip --data synth --out runs/ddp --device cpu
    tag2mask train weclip --data synth --out runs/synth --resume   # continue from its newest complete checkpoint

A run folder is never overwritten: an existing one needs --resume (continue) or --overwrite (start
again; its checkpoints and logs are deleted). Logs are only appended; see docs/training.md.

The sub-command is also runnable as ``python -m tag2mask.cli.train_cmd weclip ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from tag2mask.cmdline.options import (
    add_device_option,
    add_precision_option,
    add_weights_options,
    check_weights_options,
    plain_text,
    record_given_options,
    reject_options,
)
from tag2mask.cmdline.run_options import add_run_options, resume_command
from tag2mask.cmdline import option_types as ot

__all__ = ["add_parser", "run"]

# default (train split, val split) per data set kind; the official VOC run validates on VOC train
_SPLITS = {"synth": ("train", "val"), "voc": ("train_aug", "train"), "coco": ("train", None), "folder": ("train", None)}


def add_parser(methods: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """``tag2mask train weclip`` (registered in :mod:`tag2mask.methods.registry`)."""
    w = methods.add_parser(
        "weclip",
        help="WeCLIP: frozen CLIP + decoder trained on its online pseudo labels",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("--data", required=True,
                   help="'synth' (synthetic world), a VOC root (labels from Annotations/*.xml), a COCO root in the "
                        "WSSS layout (<split>.txt with class ids) or an image folder (with --labels)")
    w.add_argument("--preset", choices=("voc", "coco", "synth"), default=None,
                   help="recipe preset (default: from the data set kind; folders use voc)")
    w.add_argument("--classes", default=None,
                   help="foreground class prompts: 'a, b, c' or a file with one class per line (default: the preset's)")
    w.add_argument("--background", default=None, help="background words 'sky, grass' (default: the preset's)")
    w.add_argument("--labels", default=None, help="JSON/CSV image-level labels for an image folder")
    w.add_argument("--train-split", default=None, help="training split (VOC train_aug, COCO train, synth train)")
    w.add_argument("--val-split", default=None, help="validation split with GT masks; 'none' disables (VOC default: train)")
    w.add_argument("--val-limit", type=ot.positive_int(ot.MAX_COUNT), default=None, help="validate on at most this many images")
    add_run_options(w, out_help="run folder: checkpoints, config.json, train_log.csv, val_log.csv", ckpt_every=1000,
                    log_every=10, seed=1, seed_help="random seed (official: 1)", tensorboard="auto")
    w.add_argument("--iters", type=ot.positive_int(ot.MAX_ITERS), default=None, help="total iterations (VOC 30000, COCO 80000)")
    w.add_argument("--batch-size", type=ot.positive_int(ot.MAX_BATCH), default=None, help="global batch, split over processes (default: the preset's, 4)")
    w.add_argument("--crop", type=ot.positive_int(ot.MAX_SIDE), default=None, help="square crop size, multiple of 16 (default: the preset's, 320; synth 128)")
    w.add_argument("--lr", type=ot.finite_float(0, 10, lo_open=True), default=None, help="effective decoder learning rate (default: the preset's, 2e-3 = official 2e-4 x 10)")
    w.add_argument("--rfm-start", type=ot.non_negative_int(ot.MAX_ITERS), default=None,
                   help="0-based iteration from which RFM is used (VOC 9144 = released code's effective switch; "
                        "15000 = its nominal one; COCO 40000)")
    w.add_argument("--normalization", choices=("imagenet", "clip"), default=None,
                   help="input normalisation (official: imagenet)")
    w.add_argument("--no-compat", action="store_true",
                   help="pure float32 numerics (no fp16 rounding of CLIP weights / positional embeddings / decoder out-proj)")
    w.add_argument("--val-every", type=ot.non_negative_int(ot.MAX_ITERS, note="0: only at the end"), default=2000, help="validate every N iterations (0 = never)")
    w.add_argument("--synth-n", type=ot.positive_int(1_000_000), default=64, help="synthetic images per split")
    w.add_argument("--synth-size", type=ot.int_in(16, ot.MAX_SIDE), default=160, help="synthetic image size")
    add_weights_options(w)
    add_device_option(w)
    add_precision_option(w)
    w.set_defaults(func=run)
    record_given_options(w)
    return w


def _is_synth_export_root(root: str) -> bool:
    from tag2mask.synth.export import export_splits

    return export_splits(root) is not None


def _default_splits(kind: str, root: str) -> tuple[str, Optional[str]]:
    """Training and validation split names for a data set kind (an export's val only when it wrote one)."""
    if kind == "synth_export":
        from tag2mask.synth.export import export_splits

        return export_splits(root)
    return _SPLITS[kind]


def build_config(args: argparse.Namespace):
    """The :class:`WeCLIPConfig` of the command line (preset + overrides) and the data set kind."""
    from tag2mask.data.datasets import detect_dataset
    from tag2mask.methods.weclip.model import preset, split_names
    from tag2mask.methods.weclip.train_task import config_with_overrides

    kind = "synth" if args.data == "synth" else detect_dataset(args.data)
    if kind is None:
        raise FileNotFoundError(f"--data {args.data}: not 'synth', a VOC/COCO root or an image folder")
    if kind == "voc" and _is_synth_export_root(args.data):
        kind = "synth_export"  # `tag2mask synth export` output: VOC layout, synthetic classes and splits
    config = preset(args.preset or {"voc": "voc", "coco": "coco", "synth": "synth", "synth_export": "synth"}.get(kind, "voc"))
    if kind == "folder" and args.classes is None:
        raise ValueError("--data FOLDER needs --classes (the foreground class names of its label file)")
    if kind == "folder" and getattr(config, "label_source", "dataset") != "dataset":
        config = config_with_overrides(config, label_source="dataset")  # a folder has only its --labels file
    return config_with_overrides(
        config,
        classes=split_names(args.classes) if args.classes else None,
        background=split_names(args.background) if args.background is not None else None,
        max_iters=args.iters, batch_size=args.batch_size, crop_size=args.crop, lr=args.lr,
        rfm_start_iter=args.rfm_start, normalization=args.normalization,
        compat_numerics=False if args.no_compat else None,
    ), kind


def run(args: argparse.Namespace) -> int:
    from tag2mask.cmdline.options import shipped_weights_path
    from tag2mask.methods.weclip.train_task import TrainOptions, train_weclip

    check_weights_options(args)
    config, kind = build_config(args)
    train_split, val_split = _default_splits(kind, args.data)
    if args.val_split is not None:
        val_split = None if args.val_split.lower() == "none" else args.val_split
    if kind != "synth":
        reject_options(args, ("synth_n", "synth_size"), "without --data synth (they size the generated world)")
    if kind != "folder":
        reject_options(args, ("labels",), f"to a {kind.replace('_', ' ')} data set (its labels come with it)")
    if val_split is None:
        reject_options(args, ("val_limit",), "without a validation split")
    if config.warmup_iters >= config.max_iters:
        # why: the lr is still ramping up from warmup_ratio · lr when such a run stops
        print(f"warning: --iters {config.max_iters} ends within the {config.warmup_iters}-iteration learning-rate "
              f"warm-up: the whole run trains below the full learning rate (use more than {config.warmup_iters} "
              "iterations)", file=sys.stderr)
    weights = args.weights or str(shipped_weights_path())
    opts = TrainOptions(
        out_dir=args.out, weights=weights, data=args.data, train_split=args.train_split or train_split,
        val_split=val_split, labels_file=args.labels, synth_n=args.synth_n, synth_size=args.synth_size,
        val_limit=args.val_limit, ckpt_every=args.ckpt_every, val_every=args.val_every, log_every=args.log_every,
        resume=args.resume, stop_at=args.stop_at, device=args.device, precision=args.precision, seed=args.seed,
        num_workers=args.workers, tensorboard=args.tensorboard, progress=not args.quiet,
        overwrite=args.overwrite, keep_last=args.keep_last, resume_command=resume_command(),
    )
    summary = train_weclip(config, opts)
    if os.environ.get("RANK", "0") == "0":
        last = summary.get("last", {})
        print(json.dumps({"iterations": summary["iterations"], "loss": last.get("loss"),
                          "val": summary["val"][-1] if summary["val"] else None,
                          "checkpoint": summary["checkpoints"][-1] if summary["checkpoints"] else None}))
    return 0
