"""``tag2mask train segmenter``: train a segmentation network on pseudo-labels or ground-truth masks (see DESCRIPTION)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

from tag2mask.cmdline.options import add_device_option, add_precision_option
from tag2mask.cmdline.run_options import add_run_options

__all__ = ["add_segmenter_parser", "run_segmenter"]


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

# default (train split, validation split) per data set kind
_SPLITS = {"voc": ("train_aug", "val"), "coco": ("train", "val"), "folder": (None, None)}

_MCP_SETTINGS = ("annotation-free", "voc20", "context59", "coco-stuff", "voc20-zs", "voc21-zs", "coco-stuff-zs",
                 "context60-zs")  # tag2mask.methods.maskclip_plus.recipe.SETTINGS (not imported for --help)
PRESET_CHOICES = ("clip-es", "weclip-fs", "maskclip+", *(f"maskclip+:{n}" for n in _MCP_SETTINGS[1:]), "fma", "fma:coco")
# options that only a MaskCLIP+ run reads
_MCP_OPTIONS = ("unseen", "self_train_from", "key_smoothing", "prompt_denoising", "teacher_confidence",
                "teacher_preset", "templates")


def add_segmenter_parser(methods: "argparse._SubParsersAction") -> argparse.ArgumentParser:
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
                        "transformers network for segformer / upernet / mask2former)")
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
    s.add_argument("--val-every", type=int, default=0, help="validate every N iterations (default 0: only at the end)")
    s.add_argument("--val-limit", type=int, default=None, help="validate on at most N images during training")
    s.add_argument("--no-eval", action="store_true", help="no evaluation of the validation set at the end")
    s.add_argument("--iters", type=int, default=None, help="total iterations (clip-es 20000, weclip-fs 30000)")
    s.add_argument("--batch-size", type=int, default=None, help="global batch, split over processes")
    s.add_argument("--crop", type=int, default=None, help="square training crop")
    s.add_argument("--lr", type=float, default=None,
                   help="base learning rate (clip-es 2e-4 ImageNet init; use 2.5e-5 with the COCO-pretrained init)")
    s.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="optimiser (default: the preset's)")
    m = s.add_argument_group("MaskCLIP+ (--preset maskclip+...)")
    m.add_argument("--unseen", default=None, metavar="NAMES",
                   help="with maskclip+ (annotation-free): a zero-shot split of your own, 'sheep, sofa' or label "
                        "values; the other classes are read from the masks")
    m.add_argument("--self-train-from", type=int, default=None, metavar="ITER",
                   help="0-based iteration from which the network's own predictions replace the teacher's "
                        "(zero-shot settings: the official 2000th/4000th/8000th iteration; default off)")
    m.add_argument("--key-smoothing", type=float, default=None, metavar="T",
                   help="teacher key smoothing threshold (official ks configs: 1.0; off when not given)")
    m.add_argument("--prompt-denoising", type=float, default=None, metavar="T",
                   help="teacher prompt denoising threshold (official pd configs: 0.5; off when not given)")
    m.add_argument("--teacher-confidence", type=float, default=None, metavar="T",
                   help="pixels whose best teacher score is below T stay unlabelled (off when not given)")
    m.add_argument("--teacher-preset", choices=("published", "default"), default=None,
                   help="the teacher's open-vocabulary preset: published (MaskCLIP's numerics and 85 templates, "
                        "default) or default (docs/open_vocabulary.md)")
    m.add_argument("--templates", default=None,
                   help="teacher prompt templates: a set name (maskclip85, imagenet80) or one template with {}")
    add_run_options(s, ckpt_every=2000, log_every=20, seed=1)
    s.add_argument("--allow-download", action="store_true", help="let the network fetch pretrained weights from the hub")
    add_device_option(s)
    add_precision_option(s)
    s.set_defaults(func=run_segmenter)
    return s


def _parse_option(text: str) -> tuple[str, Any]:
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
    from tag2mask.cli.eval_cmd import resolve_classes
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


def _is_maskclip_plus(preset: Optional[str]) -> bool:
    return preset is not None and preset.split(":")[0] == "maskclip+"


def _network_options(args: argparse.Namespace, network: str, teacher_clip: bool = False) -> dict[str, Any]:
    """``--model-option`` values plus what --pretrained / --backbone-pretrained / --weights fill in."""
    options = dict(_parse_option(o) for o in args.model_option)
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


def _recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key, value in (("max_iters", args.iters), ("batch_size", args.batch_size), ("crop_size", args.crop),
                       ("lr", args.lr), ("optimizer", args.optimizer)):
        if value is not None:
            overrides[key] = value
    return overrides


def build_segmenter_config(args: argparse.Namespace, kind: str):
    """The :class:`SegmenterConfig` of the command line (preset + overrides); not for MaskCLIP+ (see below)."""
    from tag2mask.segmenter.task import segmenter_preset

    given = [f"--{d.replace('_', '-')}" for d in _MCP_OPTIONS if getattr(args, d) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --preset maskclip+ only")
    model = args.model or (None if args.preset else "deeplab-v2")
    preset_model = None
    if args.preset:
        from tag2mask.segmenter.task import SEGMENTER_PRESETS

        preset_model = SEGMENTER_PRESETS[args.preset]["model"]
        if model is not None and model != preset_model:
            raise ValueError(f"--preset {args.preset} trains {preset_model}; drop --model {model} or the preset")
    network = model or preset_model
    overrides: dict[str, Any] = {"model_options": _network_options(args, network),
                                 "classes": tuple(resolve_class_names(args.classes, args.masks, kind, args.data)),
                                 "background": not args.no_background, **_recipe_overrides(args)}
    if model is not None:
        overrides["model"] = model
    return segmenter_preset(args.preset, **overrides)


def _maskclip_vocabulary(args: argparse.Namespace, setting: Any):
    """The classes (and background words) of a MaskCLIP+ run: --classes, else the setting's, else the masks'."""
    from tag2mask.data.segmentation import pseudo_label_classes
    from tag2mask.vocab.vocabulary import Vocabulary, load_vocabulary

    if args.classes is not None:
        return load_vocabulary(args.classes)
    if setting.classes is not None:
        return None  # the setting's own
    recorded = pseudo_label_classes(args.masks) if args.masks else None
    if recorded:
        return Vocabulary.from_names(recorded)
    raise ValueError("--classes is needed: the teacher prompts with the class names (a file, 'cat, dog; background: "
                     "sky, grass', voc, synth)")


def build_maskclip_plus(args: argparse.Namespace, kind: str):
    """``(config, MaskClipPlus, setting)`` of a ``--preset maskclip+[:SETTING]`` command line."""
    from tag2mask.cmdline.options import shipped_weights_path
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.maskclip_plus.recipe import SETTINGS, MaskClipPlus, maskclip_plus_config

    name = args.preset.split(":", 1)[1] if ":" in args.preset else "annotation-free"
    setting = SETTINGS[name]
    network = args.model or setting.recipe.get("model", "deeplab-v2")
    options = _network_options(args, network, teacher_clip=True)
    weights = args.weights or str(shipped_weights_path())
    clip = load_clip(weights, allow_download=args.allow_download or None)
    teacher = {k: v for k, v in (("preset", args.teacher_preset), ("templates", args.templates),
                                 ("key_smoothing", args.key_smoothing), ("prompt_denoising", args.prompt_denoising),
                                 ("confidence", args.teacher_confidence)) if v is not None}
    overrides = _recipe_overrides(args)
    if args.self_train_from is not None:
        overrides["self_train_from"] = args.self_train_from
    if args.model is not None:
        overrides["model"] = args.model
    unseen = [u.strip() for u in args.unseen.split(",") if u.strip()] if args.unseen else None
    config = maskclip_plus_config(
        name, _maskclip_vocabulary(args, setting), background=False if args.no_background else None, unseen=unseen,
        clip_weights=weights, clip_fingerprint=getattr(clip, "fingerprint", None), teacher=teacher,
        model_options=options, **overrides)
    return config, MaskClipPlus(clip), setting


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
    factories: dict[str, Any] = {}
    with_masks = True
    if _is_maskclip_plus(args.preset):
        config, mcp, setting = build_maskclip_plus(args, kind)
        factories = {"model_factory": mcp.network, "teacher_factory": mcp.teacher}
        # images only, unless the setting reads masks (ignore regions, seen classes) or masks are given
        with_masks = setting.uses_masks or args.masks is not None or args.unseen is not None
    else:
        config = build_segmenter_config(args, kind)
    from tag2mask.synth.export import export_splits

    splits = (export_splits(args.data) if kind == "voc" else None) or _SPLITS[kind]
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
            from tag2mask.cli.eval_cmd import format_table

            print(format_table(task.final_eval["class_names"], {"IoU": task.final_eval["scores"]}))
            report["eval"] = {"miou": task.final_eval["scores"]["Mean IoU"],
                              "report": str(Path(args.out) / "eval" / "eval.json")}
            if "zero_shot" in task.final_eval:
                report["eval"]["zero_shot"] = task.final_eval["zero_shot"]
        print(json.dumps(report))
    return 0
