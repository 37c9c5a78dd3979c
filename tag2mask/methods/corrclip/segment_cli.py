"""``tag2mask segment --method corrclip``: CorrCLIP's own options (DINO, regions), name files and segmenter.

The ``segment`` hooks of :mod:`tag2mask.cli.segment_methods` (registered as
``Command("segment", "corrclip", this module)``). Imports no torch at module level, so ``--help`` stays light.
"""

from __future__ import annotations

import argparse
import sys

from tag2mask.cmdline.options import reject_options
from tag2mask.methods.corrclip.options import DEFAULT_DINO, OPTION_DESTS, add_corrclip_options, check_region_options

__all__ = ["METHODS", "OPTION_DESTS", "PRESET_ROWS", "METACLIP_HINT", "add_segment_options", "check_segment_options",
           "segment_preset", "segment_vocabulary", "build_segmenter", "segment_settings", "segment_warnings"]

METHODS = ("corrclip",)
# OPTION_DESTS (imported): what this module adds to ``segment`` (a trained run, --checkpoint, takes none of them)
#: options of the methods/ovss pipeline that CorrCLIP does not take (it has its own last block)
_OLDER_ONLY = ("last_block", "compat", "pamr", "naclip_std", "pamr_steps", "pamr_dilations")

PRESET_ROWS = """\
  corrclip   published  336         slide 336/112  40           off   fp16-rounded; DINO + --regions; MetaCLIP B/16"""
#: what CorrCLIP's published numbers were produced with
METACLIP_HINT = ("CorrCLIP's published numbers use MetaCLIP ViT-B-16-quickgelu weights (open_clip 'metaclip_fullcc', "
                 "file b16_fullcc2.5b.pt) and DINO ViT-B/8")


def add_segment_options(p: argparse.ArgumentParser) -> None:
    """CorrCLIP's options (refused for the other methods): :func:`tag2mask.methods.corrclip.options.add_corrclip_options`."""
    add_corrclip_options(p)


def check_segment_options(args: argparse.Namespace) -> None:
    """Called for every ``--method``: CorrCLIP's options are errors elsewhere; cheap checks before loading."""
    if args.method not in METHODS:
        reject_options(args, OPTION_DESTS, f"to --method {args.method} (only to corrclip)")
        return
    reject_options(args, _OLDER_ONLY, f"to --method {args.method} (it has its own last block and refinement)")
    if args.regions is None:
        reject_options(args, ("sam_weights",), "without --regions sam")
    check_region_options(args, "segment")
    if not args.checkpoint and not args.regions:
        raise ValueError("--method corrclip needs --regions DIR|sam|slic|felzenszwalb")


def segment_preset(method: str, name: str):
    """CorrCLIP's preset (:func:`tag2mask.methods.ovss2.presets.get_preset`)."""
    from tag2mask.methods.ovss2.presets import get_preset

    return get_preset(method, name)


def segment_vocabulary(spec: str, first_line_background):
    """``--classes``: CorrCLIP's ``"; "`` name files read as they are, everything else as usual."""
    from tag2mask.methods.corrclip.names import is_corrclip_nameset, read_corrclip_names
    from tag2mask.vocab.vocabulary import load_vocabulary

    if is_corrclip_nameset(spec):
        return read_corrclip_names(spec, first_line_background is not False)
    return load_vocabulary(spec, first_line_background=first_line_background)


def build_segmenter(model, vocab, args: argparse.Namespace, preset, overrides: dict):
    """The :class:`~tag2mask.methods.corrclip.segmenter.CorrClipSegmenter` with its DINO and region source."""
    from tag2mask.methods.corrclip.segmenter import corrclip_predictor

    allow = bool(getattr(args, "allow_download", False)) or None
    return corrclip_predictor(model, vocab, "corrclip", dino=args.dino or DEFAULT_DINO, regions=args.regions,
                              dino_heads=args.dino_heads, sam_weights=args.sam_weights, allow_download=allow,
                              preset=preset, **overrides)


def segment_settings(args: argparse.Namespace, segmenter) -> dict:
    """The settings-guard entries of CorrCLIP's options and its DINO fingerprint (a changed file is a change)."""
    out = {d: getattr(args, d) for d in OPTION_DESTS}
    out["dino_weights"] = getattr(getattr(segmenter, "dino", None), "fingerprint", None)
    return out


def segment_warnings(model, preset) -> list[str]:
    """A published CorrCLIP run with a CLIP that is not recognisably MetaCLIP B/16 gets a warning (stderr too)."""
    source = str(getattr(model, "source_path", "") or "").lower()
    arch = (model.visual.patch_size, model.visual.width, model.visual.num_blocks)
    if not str(preset.name).startswith("published") or ("metaclip" in source or "fullcc" in source) \
            and arch == (16, 768, 12):
        return []
    text = f"{METACLIP_HINT}; this CLIP ({source or 'the shipped tiny CLIP'}) is not recognised as MetaCLIP B/16 " \
           "(by its file name and architecture): pass --weights b16_fullcc2.5b.pt to reproduce them"
    print(f"warning: {text}", file=sys.stderr)
    return [text]
