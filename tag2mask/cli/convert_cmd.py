"""``tag2mask convert``: bring checkpoints from elsewhere into tag2mask's safe run-folder format (see DESCRIPTION)."""

from __future__ import annotations

import argparse
import importlib
import json

from tag2mask.methods import registry

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
    for _, command in registry.commands("convert"):  # each method's own converter (tag2mask convert weclip)
        importlib.import_module(command.module).add_parser(kinds)
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


def _run_checkpoint(args: argparse.Namespace) -> int:
    from tag2mask.runs.old_formats import resave_legacy_checkpoint

    saved = resave_legacy_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(json.dumps({"run": args.out, "checkpoint": str(saved)}))
    return 0
