"""A method folder in miniature for tests/test_method_registry.py: a top-level command and a train sub-command."""

from __future__ import annotations

import argparse

CALLS: list[tuple[str, str]] = []


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """``tag2mask tagdemo --name N`` (top level) and ``tag2mask train tagdemo --name N``: the same module serves both."""
    p = sub.add_parser("tagdemo", help="a method's own command")
    p.add_argument("--name", required=True)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    CALLS.append((getattr(args, "command", ""), args.name))
    return 0
