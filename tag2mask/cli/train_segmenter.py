"""``tag2mask train segmenter``: train a segmentation network on pseudo-labels or ground-truth masks (see DESCRIPTION)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from tag2mask.cmdline.options import add_device_option, add_precision_option
from tag2mask.cmdline.run_options import add_run_options
from tag2mask.cmdline.segmenter_options import (
    SPLITS,
    network_options,
    open_train_val,
    recipe_overrides,
    resolve_class_names,
)
from tag2mask.cmdline import option_types as ot
from tag2mask.methods import registry

__all__ = ["add_parser", "run_segmenter"]


DESCRIPTION = """Train a segmentation network on pseudo-labels or ground-truth masks.

examples:
  CLIP-ES stage 3: DeepLab-v2 on the CRF pseudo-masks of 'tag2mask label' (255 = low confidence)
    tag2mask label VOCdevkit/VOC2012 --split train_aug --classes voc --weights ViT-B-16.pt --refine crf --out seeds
    tag2mask train segmenter --preset clip-es --data VOCdevkit/VOC2012 --masks seeds \\
        --pretrained resnet101_imagenet.pth --out runs/deeplab --device cuda
  WeCLIP's fully supervised setting: its frozen-CLIP decoder on the ground truth
    tag2mask train segmenter --preset weclip-fs --data VOCdevkit/VOC2012 --weights ViT-B-16.pt --out runs/fs
  MaskCLIP+ annotation-free: the frozen MaskCLIP labels every pixel of unlabelled images (no masks)
    tag2mask train segmenter --preset maskclip+ --data photos/ --classes "cat, dog; background: sky, grass" \\
        --weights ViT-B-16.pt --pretrained resnet101_v1c.pth --out runs/mcp --device cuda
  MaskCLIP+ transductive zero-shot on VOC (seen classes from the ground truth, 5 unseen from the teacher,
  self-training from the 2000th iteration)
    tag2mask train segmenter --preset maskclip+:voc21-zs --data VOCdevkit/VOC2012 --weights RN50.pt \\
        --pretrained resnet101_v1c.pth --out runs/mcp_zs --device cuda
  FMA-WSSS stage 2: Mask2Former Swin-L on the fine seeds of 'tag2mask seed'
    tag2mask train segmenter --preset fma --data VOCdevkit/VOC2012 --masks fine_seeds \\
        --backbone-pretrained swin-large-patch4-window12-384-in22k/ --out runs/fma_m2f --device cuda
  any network on a folder of images and masks
    tag2mask train segmenter --model segformer --model-option variant=b2 --data photos/ --masks seeds/masks \\
        --classes "cat, dog" --out runs/segformer --iters 8000

MaskCLIP+ settings (--preset maskclip+:NAME; plain maskclip+ = annotation-free on images only, the
teacher labels every pixel, background through background words):
  voc20          annotation-free VOC-20 (ground-truth background ignored, as published), 2k iterations
  context59      annotation-free Pascal Context-59 (background ignored), crop 480, 4k
  coco-stuff     annotation-free COCO-Stuff-171, 8k
  voc20-zs       zero-shot VOC-20, unseen potted plant, sheep, sofa, train, tv monitor; 20k
  voc21-zs       zero-shot VOC with a learned background, the same unseen; 20k
  coco-stuff-zs  zero-shot COCO-Stuff-171, 15 unseen (ZegCLIP's split); 80k
  context60-zs   zero-shot Pascal Context-60, DeepLab-v3+, 10 unseen; 40k
The zero-shot settings read the seen classes from the ground truth and switch to self-training after a
tenth of the schedule; context59 / coco-stuff / context60-zs need --classes (59 / 171 / 59 names).

The run folder is the training engine's (docs/training.md): checkpoints, --resume, --overwrite,
torchrun, append-only logs; at the end OUT/model.safetensors and, with a validation set, OUT/eval/
(predicted masks + eval.json, as 'tag2mask eval' writes it). Recipes: docs/segmenter.md.
"""


#: every recipe a method registers (registry order)
PRESET_CHOICES = registry.segmenter_recipe_names()


def _recipe_setups() -> list:
    """The modules of the methods whose recipes need their own options and set-up (``recipe_setup``)."""
    import importlib

    return [importlib.import_module(m.recipe_setup) for m in registry.METHODS if m.recipe_setup]


def _setup_of(preset: Optional[str]) -> Optional[str]:
    """The ``recipe_setup`` module name of the method owning ``preset`` (``None``: plain config recipe)."""
    return registry.segmenter_recipe_owner(preset).recipe_setup if preset else None


def add_parser(methods: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    s = methods.add_parser("segmenter", help="a segmentation network on pseudo-labels or ground truth (CLIP-ES stage 3, "
                                             "WeCLIP fully supervised, any network)",
                           description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--data", required=True, help="VOC root, COCO root (VOC layout) or image folder")
    s.add_argument("--masks", default=None,
                   help="label maps to train on: a 'tag2mask label' run folder or a folder of palette PNGs "
                        "(0 background, class id + 1, 255 ignore); default: the data set's ground truth")
    s.add_argument("--preset", choices=PRESET_CHOICES, default=None, metavar="PRESET",
                   help="a paper's recipe: clip-es (DeepLab-v2 ResNet-101, deeplab-pytorch settings), weclip-fs "
                        "(WeCLIP's frozen-CLIP decoder on ground truth), maskclip+ or maskclip+:SETTING (DeepLab-v2 "
                        "with a text-embedding classifier taught by the frozen MaskCLIP; settings listed above), fma "
                        "or fma:coco (Mask2Former Swin-L, FMA-WSSS stage 2); options below override it")
    s.add_argument("--model", default=None, help="network (tag2mask.models): deeplab-v2, deeplab-v3plus, segformer, "
                                                 "upernet, mask2former, clip-decoder (default: the preset's, else deeplab-v2)")
    s.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the network's config (JSON value or string), repeatable, e.g. variant=b2")
    s.add_argument("--pretrained", default=None,
                   help="pretrained weights file or folder (the network's 'pretrained': a ResNet for DeepLab, a whole "
                        "transformers network for segformer / upernet / mask2former). Without it DeepLab starts from a "
                        "random ResNet and trains its BatchNorm (a warning says so); for a quick CPU try, "
                        "--model-option variant=tiny builds a small ResNet")
    s.add_argument("--backbone-pretrained", default=None,
                   help="upernet / mask2former: ImageNet backbone folder or hub id (e.g. Swin-L ImageNet-22k for fma)")
    s.add_argument("--weights", default=None,
                   help="CLIP weights: of clip-decoder (its 'clip_weights') and, with maskclip+, of the teacher "
                        "(default: the tiny CLIP shipped with tag2mask)")
    s.add_argument("--classes", default=None,
                   help="foreground classes: voc, coco, synth, a file (one per line) or 'a, b, c' (default: the classes "
                        "recorded by 'tag2mask label' in --masks, or the data set's)")
    s.add_argument("--no-background", action="store_true", help="label 0 is a class, not background")
    s.add_argument("--train-split", default=None, help="VOC/COCO split to train on (default train_aug / train)")
    s.add_argument("--val-data", default=None, help="validation data (default: the training data set for VOC/COCO roots)")
    s.add_argument("--val-split", default=None, help="validation split (default val; 'none' disables)")
    s.add_argument("--val-masks", default=None, help="ground-truth masks of --val-data when it is an image folder")
    s.add_argument("--val-every", type=ot.non_negative_int(ot.MAX_ITERS, note="0: only at the end"), default=0, help="validate every N iterations (default 0: only at the end)")
    s.add_argument("--val-limit", type=ot.positive_int(ot.MAX_COUNT), default=None, help="validate on at most N images during training")
    s.add_argument("--no-eval", action="store_true", help="no evaluation of the validation set at the end")
    s.add_argument("--iters", type=ot.positive_int(ot.MAX_ITERS), default=None, help="total iterations (clip-es 20000, weclip-fs 30000)")
    s.add_argument("--batch-size", type=ot.positive_int(ot.MAX_BATCH), default=None, help="global batch, split over processes")
    s.add_argument("--crop", type=ot.positive_int(ot.MAX_SIDE), default=None, help="square training crop")
    s.add_argument("--lr", type=ot.finite_float(0, 10, lo_open=True), default=None,
                   help="base learning rate (clip-es 2e-4 ImageNet init; use 2.5e-5 with the COCO-pretrained init)")
    s.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="optimiser (default: the preset's)")
    for setup in _recipe_setups():  # a recipe's own options (MaskCLIP+'s teacher, ...)
        setup.add_recipe_options(s)
    add_run_options(s, ckpt_every=2000, log_every=20, seed=1)
    s.add_argument("--allow-download", action="store_true", help="let the network fetch pretrained weights from the hub")
    add_device_option(s)
    add_precision_option(s)
    s.set_defaults(func=run_segmenter)
    return s


def _reject_other_recipe_options(args: argparse.Namespace) -> None:
    """A recipe's own options (``RECIPE_OPTIONS`` of its ``recipe_setup``) are errors with any other preset."""
    chosen = _setup_of(args.preset)
    for m in registry.METHODS:
        if not m.recipe_setup or m.recipe_setup == chosen:
            continue
        options = registry.load(f"{m.recipe_setup}:RECIPE_OPTIONS")
        given = [f"--{d.replace('_', '-')}" for d in options if getattr(args, d) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --preset {m.name} only")


def build_segmenter_config(args: argparse.Namespace, kind: str):
    """The :class:`SegmenterConfig` of the command line (preset + overrides) for a recipe that is a config only."""
    model = args.model or (None if args.preset else "deeplab-v2")
    preset_model = None
    if args.preset:
        preset_model = registry.segmenter_recipe(args.preset)["model"]
        if model is not None and model != preset_model:
            raise ValueError(f"--preset {args.preset} trains {preset_model}; drop --model {model} or the preset")
    network = model or preset_model
    overrides: dict[str, Any] = {"model_options": network_options(args, network),
                                 "classes": tuple(resolve_class_names(args.classes, args.masks, kind, args.data)),
                                 "background": not args.no_background, **recipe_overrides(args)}
    if model is not None:
        overrides["model"] = model
    config = registry.segmenter_preset(args.preset, **overrides)
    _train_norm_of_random_backbone(config, explicit=overrides["model_options"])
    return config


def _train_norm_of_random_backbone(config, explicit: dict[str, Any]) -> None:
    """DeepLab-v2 without ``pretrained``: train its BatchNorm (in place on ``config``) and warn.

    Frozen BatchNorm (``norm_eval``, deeplab-pytorch's ``freeze_bn``) keeps the statistics of the
    ImageNet init; of a random ResNet-101 they are meaningless (first loss ~1e5, NaN by iteration 2).
    A ``norm_eval`` given with ``--model-option`` is kept as given.
    """
    from tag2mask.models.deeplab import DeepLabV2Config

    options = config.model_options
    if config.model != "deeplab-v2" or options.get("pretrained") or "norm_eval" in explicit:
        return
    if not options.get("norm_eval", DeepLabV2Config.norm_eval):
        return
    options["norm_eval"] = False
    print("warning: no --pretrained: DeepLab starts from a random ResNet, so its BatchNorm is trained (not frozen "
          "as with an ImageNet init); pass --pretrained RESNET.pth for the paper's recipe "
          "(a quick CPU try: --model-option variant=tiny)", file=sys.stderr)


def run_segmenter(args: argparse.Namespace) -> int:
    from tag2mask.cmdline.run_options import run_options_from_args
    from tag2mask.data.datasets import detect_dataset
    from tag2mask.engine.loop import train
    from tag2mask.segmenter.task import SegmenterTask

    kind = detect_dataset(args.data)
    if kind is None:
        raise FileNotFoundError(f"--data {args.data}: not a VOC/COCO root or an image folder")
    if args.allow_download:
        os.environ["TAG2MASK_ALLOW_DOWNLOAD"] = "1"
    _reject_other_recipe_options(args)
    factories: dict[str, Any] = {}
    with_masks = True
    setup = _setup_of(args.preset)
    if setup is not None:  # the recipe's method sets the run up (MaskCLIP+: teacher, network, data)
        config, factories, with_masks = registry.load(setup).prepare_run(args, kind)
    else:
        config = build_segmenter_config(args, kind)
    from tag2mask.synth.export import export_splits

    splits = (export_splits(args.data) if kind == "voc" else None) or SPLITS[kind]
    train_source, val_source = open_train_val(args, kind, config.mask_num_classes, splits, with_masks)
    task = SegmenterTask(config, train_source, val_source, val_limit=args.val_limit,
                         evaluate_at_end=not args.no_eval, **factories)
    options = run_options_from_args(args, val_every=args.val_every)
    summary = train(task, options)
    if os.environ.get("RANK", "0") == "0":
        report = {"iterations": summary["iterations"], "loss": summary.get("last", {}).get("loss"),
                  "checkpoint": summary["checkpoints"][-1] if summary["checkpoints"] else None,
                  "train_pairs": len(train_source)}
        if task.final_eval is not None:
            from tag2mask.evaluation.tables import format_table

            print(format_table(task.final_eval["class_names"], {"IoU": task.final_eval["scores"]}))
            report["eval"] = {"miou": task.final_eval["scores"]["Mean IoU"],
                              "report": str(Path(args.out) / "eval" / "eval.json")}
            if "zero_shot" in task.final_eval:
                report["eval"]["zero_shot"] = task.final_eval["zero_shot"]
        print(json.dumps(report))
    return 0
