"""``tag2mask segment --method scclip|pearl``: SC-CLIP's and PEARL's own options and segmenter.

The ``segment`` hooks of :mod:`tag2mask.cli.segment_methods` (registered as
``Command("segment", NAME, this module)``). Imports no torch at module level, so ``--help`` stays light.
"""

from __future__ import annotations

import argparse

from tag2mask.cmdline import option_types as ot
from tag2mask.cmdline.options import given, reject_options

__all__ = ["METHODS", "OPTION_DESTS", "PRESET_ROWS", "add_segment_options", "check_segment_options", "segment_preset",
           "segment_vocabulary", "build_segmenter", "segment_settings", "segment_warnings"]

#: the methods this module serves (kept in step with the registry's ``segment`` commands)
METHODS = ("scclip", "pearl")
#: option dest -> the methods it applies to
_OWN = {"token_map": ("scclip",), "alpha_kk": ("pearl",), "tlp": ("pearl",), "tlp_grid": ("pearl",)}
#: options of the methods/ovss pipeline that these methods do not take (they have their own last block)
#: what this module adds to ``segment`` (a trained run, --checkpoint, takes none of them)
OPTION_DESTS = tuple(_OWN)
OLDER_ONLY = ("last_block", "compat", "pamr", "naclip_std", "pamr_steps", "pamr_dilations")
#: the option dest -> the preset field it overrides
_FIELDS = {"token_map": "scclip_token_map", "alpha_kk": "alpha_kk", "tlp": "tlp", "tlp_grid": "tlp_grid"}

PRESET_ROWS = """\
  scclip     published  336         slide 224/112  40           off   fp16-rounded; LOF anomaly smoothing
  pearl      published  336         slide 224/112  40           off   fp16-rounded; TLP on, alpha_kk 0.08"""


def add_segment_options(p: argparse.ArgumentParser) -> None:
    """SC-CLIP's and PEARL's options (each refused for a method it does not apply to)."""
    p.add_argument("--token-map", default=None, choices=("correct", "official"),
                   help="scclip: token -> grid cell mapping of the anomaly smoothing; 'official' is the released "
                        "code's (i // rows, i %% rows), wrong for non-square windows (default: correct)")
    p.add_argument("--alpha-kk", type=ot.finite_float(0, 100, note="0 = no key-key term"), default=None,
                   help="pearl: weight of the key-key attention term (default: preset's, 0.08; ADE/City 0.3)")
    p.add_argument("--tlp", action=argparse.BooleanOptionalAction, default=None,
                   help="pearl: text-aware Laplacian propagation of the logits (default: preset's, on)")
    p.add_argument("--tlp-grid", type=ot.positive_int(ot.MAX_SIDE), default=None, help="pearl: TLP target grid (default: preset's, 80)")


def check_segment_options(args: argparse.Namespace) -> None:
    """Called for every ``--method``: options given to a method they do not apply to are errors."""
    for dest, methods in _OWN.items():
        if args.method not in methods:
            reject_options(args, (dest,), f"to --method {args.method} (only to {', '.join(methods)})")
    if args.method in METHODS:
        reject_options(args, OLDER_ONLY, f"to --method {args.method} (it has its own last block and refinement)")


def segment_preset(method: str, name: str):
    """The method's preset (:func:`tag2mask.methods.ovss2.presets.get_preset`): a bad name fails before loading."""
    from tag2mask.methods.ovss2.presets import get_preset

    return get_preset(method, name)


def segment_vocabulary(spec: str, first_line_background):
    """``--classes`` read as for every method (:func:`tag2mask.vocab.vocabulary.load_vocabulary`)."""
    from tag2mask.vocab.vocabulary import load_vocabulary

    return load_vocabulary(spec, first_line_background=first_line_background)


def build_segmenter(model, vocab, args: argparse.Namespace, preset, overrides: dict):
    """The :class:`~tag2mask.methods.ovss2.segmenter.NewerOvssSegmenter`; ``overrides``: the shared options given."""
    from tag2mask.methods.ovss2.segmenter import NewerOvssSegmenter

    own = {_FIELDS[d]: getattr(args, d) for d in _FIELDS if getattr(args, d) is not None and given(args, d)}
    return NewerOvssSegmenter(model, vocab, args.method, preset=preset, **overrides, **own)


def segment_settings(args: argparse.Namespace, segmenter) -> dict:
    """The settings-guard entries of these options (only for these methods: older folders still resume)."""
    return {d: getattr(args, d) for d in _OWN}


def segment_warnings(model, preset) -> list[str]:
    """Nothing to warn about beyond the shared toy-model warning."""
    return []
