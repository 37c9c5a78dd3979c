"""``tag2mask train segmenter --preset maskclip+[:SETTING]``: MaskCLIP+'s own options and run set-up.

Registered as the ``recipe_setup`` of the ``maskclip+`` entry of :mod:`tag2mask.methods.registry`:
``train segmenter`` adds :func:`add_recipe_options` to its parser and calls :func:`prepare_run` for
this method's recipes (a teacher labels the images, so the run needs more than a config).
"""

from __future__ import annotations

import argparse
from typing import Any

from tag2mask.cmdline import option_types as ot
from tag2mask.cmdline.segmenter_options import network_options, recipe_overrides

__all__ = ["RECIPE_OPTIONS", "add_recipe_options", "prepare_run", "build_maskclip_plus"]

#: options that only a MaskCLIP+ run reads (errors with the other recipes)
RECIPE_OPTIONS = ("unseen", "self_train_from", "key_smoothing", "prompt_denoising", "teacher_confidence",
                  "teacher_preset", "templates")


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """The MaskCLIP+ argument group of ``train segmenter``."""
    m = parser.add_argument_group("MaskCLIP+ (--preset maskclip+...)")
    m.add_argument("--unseen", default=None, metavar="NAMES",
                   help="with maskclip+ (annotation-free): a zero-shot split of your own, 'sheep, sofa' or label "
                        "values; the other classes are read from the masks")
    m.add_argument("--self-train-from", type=ot.non_negative_int(ot.MAX_ITERS), default=None, metavar="ITER",
                   help="0-based iteration from which the network's own predictions replace the teacher's "
                        "(zero-shot settings: the official 2000th/4000th/8000th iteration; default off)")
    m.add_argument("--key-smoothing", type=ot.finite_float(0, 1000), default=None, metavar="T",
                   help="teacher key smoothing threshold (official ks configs: 1.0; off when not given)")
    m.add_argument("--prompt-denoising", type=ot.finite_float(0, 1000), default=None, metavar="T",
                   help="teacher prompt denoising threshold (official pd configs: 0.5; off when not given)")
    m.add_argument("--teacher-confidence", type=ot.finite_float(0, 1), default=None, metavar="T",
                   help="pixels whose best teacher score is below T stay unlabelled (off when not given)")
    m.add_argument("--teacher-preset", choices=("published", "default"), default=None,
                   help="the teacher's open-vocabulary preset: published (MaskCLIP's numerics and 85 templates, "
                        "default) or default (docs/open_vocabulary.md)")
    m.add_argument("--templates", default=None,
                   help="teacher prompt templates: a set name (maskclip85, imagenet80) or one template with {}")


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
    options = network_options(args, network, teacher_clip=True)
    weights = args.weights or str(shipped_weights_path())
    clip = load_clip(weights, allow_download=args.allow_download or None)
    teacher = {k: v for k, v in (("preset", args.teacher_preset), ("templates", args.templates),
                                 ("key_smoothing", args.key_smoothing), ("prompt_denoising", args.prompt_denoising),
                                 ("confidence", args.teacher_confidence)) if v is not None}
    overrides = recipe_overrides(args)
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


def prepare_run(args: argparse.Namespace, kind: str) -> tuple[Any, dict[str, Any], bool]:
    """``(config, task factories, whether the training side reads masks)`` of a MaskCLIP+ run."""
    config, mcp, setting = build_maskclip_plus(args, kind)
    factories = {"model_factory": mcp.network, "teacher_factory": mcp.teacher}
    # images only, unless the setting reads masks (ignore regions, seen classes) or masks are given
    with_masks = setting.uses_masks or args.masks is not None or args.unseen is not None
    return config, factories, with_masks
