"""``tag2mask convert``: bring checkpoints from elsewhere into tag2mask's safe run-folder format (see DESCRIPTION)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser"]

DESCRIPTION = """Bring checkpoints from elsewhere into tag2mask's safe run-folder format.

examples:
  tag2mask convert weclip WeCLIP_model_iter_30000.pth --out runs/weclip_official
  tag2mask segment photos/ --checkpoint runs/weclip_official --out seg --crf
  tag2mask convert checkpoint runs/old/latest.pt --out runs/old_resaved    (an older tag2mask checkpoint)

Every file is read with torch.load(weights_only=True): tensors and plain data only, nothing in the
file is executed (docs/training.md).
"""


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert official WeCLIP checkpoints or older tag2mask checkpoints",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
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
    w.set_defaults(func=_run_weclip)
    c = kinds.add_parser(
        "checkpoint", help="re-save a checkpoint of an older tag2mask (pickled) in the safe format",
        description="Older tag2mask versions pickled NumPy RNG states into WeCLIP checkpoints. This reads "
                    "such a file with weights_only=True plus NumPy arrays only (no other Python object is "
                    "accepted) and writes a resumable run folder in the current format.")
    c.add_argument("checkpoint", metavar="OLD_PT", help="e.g. runs/voc/latest.pt")
    c.add_argument("--out", required=True, help="run folder to create")
    c.add_argument("--overwrite", action="store_true", help="replace the checkpoint of an existing OUT")
    c.set_defaults(func=_run_checkpoint)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def _run_weclip(args: argparse.Namespace) -> int:
    from tag2mask.methods.weclip.cli import split_names
    from tag2mask.methods.weclip.convert import convert_official_weclip

    classes = split_names(args.classes) if args.classes else None
    saved = convert_official_weclip(args.checkpoint, args.out, preset_name=args.preset, classes=classes,
                                    overwrite=args.overwrite)
    print(json.dumps({"run": args.out, "checkpoint": str(saved)}))
    return 0


def _run_checkpoint(args: argparse.Namespace) -> int:
    from tag2mask.runs.old_formats import resave_legacy_checkpoint

    saved = resave_legacy_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(json.dumps({"run": args.out, "checkpoint": str(saved)}))
    return 0
