"""``tag2mask convert weclip``: an official WeCLIP checkpoint -> a tag2mask run folder (:mod:`.convert`)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def add_parser(kinds: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """The ``weclip`` kind of ``tag2mask convert`` (registered in :mod:`tag2mask.methods.registry`)."""
    w = kinds.add_parser(
        "weclip", help="an official WeCLIP .pth (decoder + CLIP weights) -> a run folder for segment --checkpoint",
        description="Read an official WeCLIP checkpoint (the state dict the official training script saves: "
                    "CLIP under encoder.*, the decoder under decoder_fts_fuse.* and decoder.*) and write a run "
                    "folder: clip.safetensors, one checkpoint with the decoder and the recipe, config.json.")
    w.add_argument("checkpoint", metavar="OFFICIAL_PTH", help="e.g. WeCLIP_model_iter_30000.pth")
    w.add_argument("--out", required=True, help="run folder to create")
    w.add_argument("--preset", choices=("voc", "coco"), default=None,
                   help="recipe and class names (default: voc for 21 classes, coco for 81)")
    w.add_argument("--classes", default=None,
                   help="foreground class names 'a, b, c' or a file with one per line (other label sets)")
    w.add_argument("--overwrite", action="store_true", help="replace the checkpoint of an existing OUT")
    w.set_defaults(func=run)
    return w


def run(args: argparse.Namespace) -> int:
    from tag2mask.methods.weclip.model import split_names
    from tag2mask.methods.weclip.convert import convert_official_weclip

    classes = split_names(args.classes) if args.classes else None
    saved = convert_official_weclip(args.checkpoint, args.out, preset_name=args.preset, classes=classes,
                                    overwrite=args.overwrite)
    print(json.dumps({"run": args.out, "checkpoint": str(saved)}))
    return 0
