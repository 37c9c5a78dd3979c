"""The ``tag2mask`` command: one entry point, one sub-command module each.

Each module in ``COMMANDS`` exposes ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``func=run`` on it, where ``run(args) -> int`` returns the exit code. ``COMMANDS`` holds the generic
commands of this package plus the top-level commands the methods bring (:mod:`tag2mask.methods.registry`,
e.g. CLIP-ES's ``prompts``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from tag2mask.version import __version__
from tag2mask.methods import registry

#: the generic commands of this package: sub-command name -> module implementing it
GENERIC: dict[str, str] = {
    "demo": "tag2mask.cli.demo_cmd",
    "info": "tag2mask.cli.info_cmd",
    "label": "tag2mask.cli.label_cmd",
    "segment": "tag2mask.cli.segment_cmd",
    "seed": "tag2mask.cli.seed_cmd",
    "serve": "tag2mask.cli.serve_cmd",
    "eval": "tag2mask.cli.eval_cmd",
    "bench": "tag2mask.cli.bench_cmd",
    "synth": "tag2mask.cli.synth_cmd",
    "train": "tag2mask.cli.train_cmd",
    "convert": "tag2mask.cli.convert_cmd",
    "export": "tag2mask.cli.export_cmd",
}


def commands() -> dict[str, str]:
    """Every top-level command: the generic ones, then those the methods bring (read from the registry now)."""
    brought = {command.name: command.module for _, command in registry.commands("")}
    clash = sorted(set(brought) & set(GENERIC))
    if clash:
        raise ValueError(f"a method's command has the name of a generic command: {clash}")
    return {**GENERIC, **brought}


#: the commands of ``tag2mask --help`` (sub-command name -> module)
COMMANDS: dict[str, str] = commands()


def build_parser() -> argparse.ArgumentParser:
    from tag2mask.cmdline.option_types import OneLineParser

    parser = OneLineParser(
        prog="tag2mask",
        description="Turn a frozen CLIP into a semantic segmenter without pixel labels.",
    )
    parser.add_argument("--version", action="version", version=f"tag2mask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in commands().values():
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if os.environ.get("TAG2MASK_DEBUG"):
            raise
        from tag2mask.cli.interrupt import interrupted_message

        print(interrupted_message(args), file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, KeyError) as e:
        # user-facing problems (bad weights, bad labels, missing extras): one clear line, no traceback
        if os.environ.get("TAG2MASK_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tag2mask {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
