"""``tag2mask train METHOD``: the generic ``segmenter`` plus every training sub-command a method registers.

The methods' sub-commands (``weclip``, ``fma``, ``clip-zss``, ...) come from
:mod:`tag2mask.methods.registry` (``Command("train", NAME, MODULE)``; ``MODULE.add_parser(subparsers)``).
Run folders, resume and torchrun: docs/training.md. Also runnable as
``python -m tag2mask.cli.train_cmd METHOD ...`` (what torchrun launches in the tests).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from tag2mask.cmdline import option_types as ot
from tag2mask.methods import registry

__all__ = ["GENERIC", "add_parser", "main"]

#: the generic training sub-commands of this package (name -> module), before the methods' own
GENERIC: dict[str, str] = {"segmenter": "tag2mask.cli.train_segmenter"}


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train WeCLIP or FMA-WSSS prompts from image-level labels, or a segmentation "
                                     "network on pseudo-labels",
                       description="Train a method that needs training: weclip (from image-level labels), fma "
                                   "(FMA-WSSS prompt contexts), segmenter (a network on pseudo-labels / masks) or "
                                   "clip-zss (a network taught by a frozen CLIP to segment unseen classes). Run "
                                   "folders, resume and torchrun: docs/training.md.")
    methods = p.add_subparsers(dest="method", metavar="METHOD")
    modules = [*GENERIC.values(), *(command.module for _, command in registry.commands("train"))]
    for module in modules:  # each sub-command module adds its own parser (none imports another)
        importlib.import_module(module).add_parser(methods)

    def choose(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=choose)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry (``python -m tag2mask.cli.train_cmd weclip ...``)."""
    parser = ot.OneLineParser(prog="tag2mask")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
