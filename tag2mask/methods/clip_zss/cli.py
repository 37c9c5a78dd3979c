"""``tag2mask train clip-zss``: a segmentation network taught by a frozen CLIP to segment unseen classes."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from tag2mask.cmdline.options import add_device_option, add_precision_option
from tag2mask.cmdline.run_options import add_run_options
from tag2mask.cmdline import option_types as ot

__all__ = ["add_clip_zss_parser", "run_clip_zss", "build_clip_zss_configs"]

_SPLITS = {"voc": ("train_aug", "val"), "coco": ("train", "val"), "folder": (None, None)}
SPLIT_NAMES = ("voc-15-5", "coco-stuff-156-15", "context-49-10", "synth-9-3")  # kept in step with vocab.zero_shot_splits
PRESET_NAMES = ("voc", "coco-stuff", "context", "synth")

DESCRIPTION = """CLIP-ZSS (inductive generalised zero-shot segmentation): train a segmentation network on the
seen classes' masks while a frozen CLIP teaches it (global CLS alignment, pseudo-labels of the unannotated
pixels); at test time the network alone segments seen and unseen classes from their names.
A reimplementation from the paper: no official code exists; values the paper leaves open are
options (--zss-option) marked "assumed" in docs/clip_zss.md.

examples:
  synthetic world (CPU): 3 of its 12 object classes unseen (ring, heart, hexagon)
    tag2mask synth export --out synth --n 200 --val 40 --size 128
    tag2mask train clip-zss --data synth --split synth-9-3 --out runs/zss --device cpu
    tag2mask segment photos/ --checkpoint runs/zss --classes "star, heart, hexagon" --out seg
  PASCAL VOC 15/5 (ZegCLIP's protocol, a SegFormer-b2 student, ViT-B/16 teacher)
    tag2mask train clip-zss --data VOCdevkit/VOC2012 --split voc-15-5 --weights ViT-B-16.pt \\
        --pretrained nvidia/mit-b2 --out runs/voc_zss --device cuda
    tag2mask eval runs/voc_zss/eval/masks --gt VOCdevkit/VOC2012/SegmentationClass --classes voc-15-5 \\
        --unseen voc-15-5
  your own label set: the unseen classes' pixels are ignored, their names never used in training
    tag2mask train clip-zss --data photos/ --masks masks/ --classes "cat, dog, cow" --unseen cow --out runs/z

The run folder is the training engine's (docs/training.md): checkpoints (student, synthesizer, CLS
bank), --resume, --overwrite, torchrun. At the end OUT/model.safetensors (the student with the text
embeddings of every class of the data set) and, with a validation set, OUT/eval/ with mIoU(S),
mIoU(U) and hIoU.
"""


def add_parser(methods: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    z = methods.add_parser("clip-zss", help="CLIP-ZSS: a network taught by a frozen CLIP to segment unseen classes "
                                            "(no CLIP image tower at test time)",
                           description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    z.add_argument("--data", required=True, help="VOC root, COCO root (VOC layout), a 'tag2mask synth export' folder or "
                                                 "an image folder (with --masks)")
    z.add_argument("--masks", default=None, help="mask folder (label values = class ids, 255 ignore); default: the data "
                                                 "set's ground truth")
    z.add_argument("--split", default=None, choices=SPLIT_NAMES,
                   help="a named seen/unseen split: its class list, unseen classes and background rule (and, unless "
                        "--preset is given, its preset)")
    z.add_argument("--preset", default=None, choices=PRESET_NAMES,
                   help="recipe: voc / coco-stuff / context (ZegCLIP's protocol, a SegFormer-b2 student; assumed) or synth "
                        "(CPU-sized); default: the split's")
    z.add_argument("--classes", default=None, help="the data set's class names in label order (without --split): voc, "
                                                   "coco, synth, a file (one per line) or 'a, b, c'")
    z.add_argument("--unseen", default=None, help="unseen class names 'a, b' (without --split)")
    z.add_argument("--background", default=None, choices=("class", "ignore", "none"),
                   help="label 0: a seen background class with a learned embedding (class), ignored in training and "
                        "scoring (ignore), or not background at all (none); default: the split's, else class")
    z.add_argument("--model", default=None, help="student network with a text head: segformer (default), clip-decoder, "
                                                 "upernet, deeplab-v2, deeplab-v3plus")
    z.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the network's config (JSON value or string), repeatable, e.g. variant=b2")
    z.add_argument("--pretrained", default=None, help="student backbone weights (file, folder or hub id)")
    z.add_argument("--weights", default=None, help="CLIP weights of the frozen teacher and text encoder (default: the "
                                                   "shipped tiny CLIP, which knows only the synthetic world)")
    z.add_argument("--zss-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a CLIP-ZSS setting (ClipZssConfig field), repeatable, e.g. glm_temperature=0.1, use_plm=false; "
                        "see docs/clip_zss.md")
    z.add_argument("--train-split", default=None, help="VOC/COCO split to train on (default train_aug / train; synth: train)")
    z.add_argument("--val-data", default=None, help="validation data (default: the training data set for VOC/COCO roots)")
    z.add_argument("--val-split", default=None, help="validation split (default val; 'none' disables)")
    z.add_argument("--val-masks", default=None, help="ground-truth masks of --val-data when it is an image folder")
    z.add_argument("--val-every", type=ot.non_negative_int(ot.MAX_ITERS, note="0: only at the end"), default=0, help="score seen/unseen every N iterations (default 0: at the end)")
    z.add_argument("--val-limit", type=ot.positive_int(ot.MAX_COUNT), default=None, help="validate on at most N images during training")
    z.add_argument("--no-eval", action="store_true", help="no evaluation of the validation set at the end")
    z.add_argument("--iters", type=ot.positive_int(ot.MAX_ITERS), default=None, help="total iterations (voc 20000, coco-stuff 80000, synth 600)")
    z.add_argument("--batch-size", type=ot.positive_int(ot.MAX_BATCH), default=None, help="global batch, split over processes")
    z.add_argument("--crop", type=ot.positive_int(ot.MAX_SIDE), default=None, help="square training crop")
    z.add_argument("--lr", type=ot.finite_float(0, 10, lo_open=True), default=None, help="base learning rate of the student backbone")
    z.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="optimiser (default: the preset's)")
    add_run_options(z, ckpt_every=2000, log_every=20, seed=1)
    z.add_argument("--allow-download", action="store_true", help="let the student fetch pretrained weights from the hub")
    add_device_option(z)
    add_precision_option(z)
    z.set_defaults(func=run_clip_zss)
    return z


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def build_clip_zss_configs(args: argparse.Namespace, kind: str):
    """``(SegmenterConfig, ClipZssConfig)`` of the command line (preset + split + overrides)."""
    from tag2mask.cmdline.segmenter_options import parse_model_option, resolve_class_names
    from tag2mask.methods.clip_zss.config import CLIP_ZSS_PRESETS, PRESET_OF_SPLIT, ClipZssConfig
    from tag2mask.vocab.zero_shot_splits import get_split
    from tag2mask.segmenter.task import segmenter_config

    preset_name = args.preset or (PRESET_OF_SPLIT.get(args.split) if args.split else None)
    preset = json.loads(json.dumps(CLIP_ZSS_PRESETS[preset_name])) if preset_name else {"segmenter": {}, "zss": {}}
    if args.split:
        if args.classes is not None or args.unseen is not None:
            raise ValueError("--classes / --unseen come from --split; give either the split or both of them")
        split = get_split(args.split)
        names, unseen = split.foreground, split.unseen
        background = args.background or split.background
        if background != split.background:
            raise ValueError(f"--split {split.name} treats label 0 as {split.background!r}; drop --background")
    else:
        if args.unseen is None:
            raise ValueError("give --split NAME, or --classes and --unseen")
        names = tuple(resolve_class_names(args.classes, args.masks, kind, args.data))
        unseen = _split_list(args.unseen)
        background = args.background or "class"
        missing = [u for u in unseen if u not in names]
        if missing:
            raise ValueError(f"--unseen {', '.join(missing)}: not among the classes ({', '.join(names)})")
    seg = dict(preset["segmenter"])
    preset_model, preset_options = seg.pop("model", "segformer"), seg.pop("model_options", {})
    model = args.model or preset_model
    # the preset's network options (e.g. variant=b2) belong to its network only
    options = {**(preset_options if model == preset_model else {}), **dict(parse_model_option(o) for o in args.model_option)}
    if args.pretrained is not None:
        if model == "clip-decoder":
            raise ValueError("--pretrained does not apply to clip-decoder (its backbone is the CLIP of --weights)")
        options["pretrained"] = args.pretrained
    for key, value in (("max_iters", args.iters), ("batch_size", args.batch_size), ("crop_size", args.crop),
                       ("lr", args.lr), ("optimizer", args.optimizer)):
        if value is not None:
            seg[key] = value
    seg_config = segmenter_config(None, **seg, model=model, model_options=options, classes=tuple(names),
                                  background=background != "none")
    zss = {**preset["zss"], **dict(parse_model_option(o) for o in args.zss_option)}
    for key in ("unseen", "background", "split"):
        if key in zss:
            raise ValueError(f"--zss-option {key}=... : use --{key} instead")
    zss_config = ClipZssConfig.from_dict({**zss, "split": args.split, "unseen": list(unseen), "background": background})
    return seg_config, zss_config


def run_clip_zss(args: argparse.Namespace) -> int:
    from tag2mask.cmdline.options import shipped_weights_path
    from tag2mask.cmdline.run_options import run_options_from_args
    from tag2mask.cmdline.segmenter_options import open_train_val
    from tag2mask.data.datasets import detect_dataset
    from tag2mask.synth.export import export_splits
    from tag2mask.methods.clip_zss.train_task import ClipZssTask
    from tag2mask.engine.loop import train

    kind = detect_dataset(args.data)
    if kind is None:
        raise FileNotFoundError(f"--data {args.data}: not a VOC/COCO root, a synth export or an image folder")
    if args.allow_download:
        os.environ["TAG2MASK_ALLOW_DOWNLOAD"] = "1"
    seg_config, zss_config = build_clip_zss_configs(args, kind)
    splits = (export_splits(args.data) if kind == "voc" else None) or _SPLITS[kind]
    train_source, val_source = open_train_val(args, kind, seg_config.num_classes, splits)
    weights = args.weights or str(shipped_weights_path())
    task = ClipZssTask(seg_config, zss_config, train_source, val_source, clip_weights=weights,
                       val_limit=args.val_limit, evaluate_at_end=not args.no_eval)
    options = run_options_from_args(args, val_every=args.val_every)
    summary = train(task, options)
    if os.environ.get("RANK", "0") == "0":
        report: dict[str, Any] = {"iterations": summary["iterations"], "loss": summary.get("last", {}).get("loss"),
                                  "checkpoint": summary["checkpoints"][-1] if summary["checkpoints"] else None,
                                  "train_pairs": len(train_source), "unseen": list(zss_config.unseen)}
        if task.final_eval is not None:
            from tag2mask.evaluation.tables import format_table

            ev = task.final_eval
            print(format_table(ev["class_names"], {"IoU": ev["scores"]}))
            su = ev["seen_unseen"]
            print("seen {}  unseen {}  hIoU {}".format(*(("-" if v is None else f"{100 * v:.2f}")
                                                         for v in (su["mIoU_seen"], su["mIoU_unseen"], su["hIoU"]))))
            report["eval"] = {**su, "miou": ev["scores"]["Mean IoU"], "report": str(Path(args.out) / "eval" / "eval.json")}
        print(json.dumps(report))
    return 0
