"""``segment --method``: the hooks of each method, read from the registry.

A method with its own ``segment`` options lists ``Command("segment", NAME, MODULE)`` in
:mod:`tag2mask.methods.registry`; MODULE defines (:data:`~tag2mask.methods.registry.SEGMENT_HOOKS`):

- ``add_segment_options(parser)`` and ``OPTION_DESTS`` (what it adds; ``--checkpoint`` refuses them),
  ``PRESET_ROWS`` (its lines of the preset table in ``segment --help``);
- ``check_segment_options(args)``: called for EVERY ``--method``, so an option given to a method it does
  not apply to is an error instead of being ignored;
- ``segment_preset(method, name)`` (before the model is loaded), ``build_segmenter(model, vocab, args,
  preset, overrides)``, ``segment_settings(args, segmenter) -> dict`` (its settings-guard entries),
  ``segment_warnings(model, preset) -> list[str]``, ``segment_vocabulary(spec, first_line_background)``
  (how ``--classes`` is read).

The methods without such a command (MaskCLIP, SCLIP, ClearCLIP, NACLIP) run the shared pipeline of
:mod:`tag2mask.methods.ovss` through the registry's ``predictor``: :class:`SharedPipeline`.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Any, Union

from tag2mask.methods import registry

__all__ = ["hook_modules", "add_options", "option_dests", "preset_rows", "check_options", "hooks_of",
           "SharedPipeline"]


def hook_modules() -> list[ModuleType]:
    """Each distinct module of the registry's ``segment`` commands, in registry order (imports no torch)."""
    seen: dict[str, ModuleType] = {}
    for _, command in registry.commands("segment"):
        seen.setdefault(command.module, importlib.import_module(command.module))
    return list(seen.values())


def add_options(parser: argparse.ArgumentParser) -> None:
    for module in hook_modules():
        module.add_segment_options(parser)


def option_dests() -> tuple[str, ...]:
    return tuple(d for module in hook_modules() for d in module.OPTION_DESTS)


def preset_rows() -> str:
    return "\n".join(module.PRESET_ROWS for module in hook_modules())


def check_options(args: argparse.Namespace) -> None:
    for module in hook_modules():
        module.check_segment_options(args)


class SharedPipeline:
    """The ``segment`` hooks of the methods of :mod:`tag2mask.methods.ovss` (no options of their own)."""

    @staticmethod
    def segment_preset(method: str, name: str):
        from tag2mask.methods.ovss.presets import get_preset

        return get_preset(method, name)

    @staticmethod
    def segment_vocabulary(spec: str, first_line_background):
        from tag2mask.vocab.vocabulary import load_vocabulary

        return load_vocabulary(spec, first_line_background=first_line_background)

    @staticmethod
    def build_segmenter(model, vocab, args: argparse.Namespace, preset, overrides: dict):
        factory = registry.load(registry.get(args.method).predictor)
        return factory(model, vocab, args.method, preset=preset, **overrides)

    @staticmethod
    def segment_settings(args: argparse.Namespace, segmenter) -> dict:
        return {}

    @staticmethod
    def segment_warnings(model, preset) -> list[str]:
        return []


def hooks_of(method: str) -> Union[ModuleType, Any]:
    """The hooks of ``method``: its registered ``segment`` module, else :class:`SharedPipeline`."""
    for _, command in registry.commands("segment"):
        if command.name == method:
            return importlib.import_module(command.module)
    return SharedPipeline
