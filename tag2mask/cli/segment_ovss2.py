"""``tag2mask segment`` options and dispatch of the newer methods (SC-CLIP, PEARL).

Kept apart from :mod:`tag2mask.cli.segment_cmd` so that the methods of
:mod:`tag2mask.methods.ovss2` plug in with a few lines there; torch is imported only when a
segmenter is built.
"""

from __future__ import annotations

import argparse

from tag2mask.cli.common import given, reject_options

__all__ = ["METHODS", "OPTION_DESTS", "add_options", "check_options", "get_preset", "make_segmenter"]

#: kept in step with tag2mask.methods.ovss2.presets.METHODS (importing it would load torch for --help)
METHODS = ("scclip", "pearl")
#: option dest -> the methods it applies to
_OWN = {"token_map": ("scclip",), "alpha_kk": ("pearl",), "tlp": ("pearl",), "tlp_grid": ("pearl",)}
OPTION_DESTS = tuple(_OWN)
#: options of the older methods that the newer ones do not take
_OLDER_ONLY = ("last_block", "compat", "pamr")

PRESET_ROWS = """\
  scclip     published  336         slide 224/112  40           off   fp16-rounded; LOF anomaly smoothing
  pearl      published  336         slide 224/112  40           off   fp16-rounded; TLP on, alpha_kk 0.08"""


def add_options(p: argparse.ArgumentParser) -> None:
    """The newer methods' own options (each rejected for a method it does not apply to)."""
    p.add_argument("--token-map", default=None, choices=("correct", "official"),
                   help="scclip: token -> grid cell mapping of the anomaly smoothing; 'official' is the released "
                        "code's (i // rows, i %% rows), wrong for non-square windows (default: correct)")
    p.add_argument("--alpha-kk", type=float, default=None,
                   help="pearl: weight of the key-key attention term (default: preset's, 0.08; ADE/City 0.3)")
    p.add_argument("--tlp", action=argparse.BooleanOptionalAction, default=None,
                   help="pearl: text-aware Laplacian propagation of the logits (default: preset's, on)")
    p.add_argument("--tlp-grid", type=int, default=None, help="pearl: TLP target grid (default: preset's, 80)")


def check_options(args: argparse.Namespace) -> None:
    """Options typed for a method they do not apply to are errors, not silently ignored."""
    for dest, methods in _OWN.items():
        if args.method not in methods:
            reject_options(args, (dest,), f"to --method {args.method} (only to {', '.join(methods)})")
    if args.method in METHODS:
        reject_options(args, _OLDER_ONLY, f"to --method {args.method} (it has its own last block and refinement)")


def get_preset(method: str, name: str):
    """The method's preset (:func:`tag2mask.methods.ovss2.presets.get_preset`)."""
    from tag2mask.methods.ovss2.presets import get_preset as ovss2_preset

    return ovss2_preset(method, name)


def _overrides(args: argparse.Namespace) -> dict:
    names = {"token_map": "scclip_token_map", "alpha_kk": "alpha_kk", "tlp": "tlp", "tlp_grid": "tlp_grid"}
    return {names[d]: getattr(args, d) for d in _OWN if getattr(args, d) is not None and given(args, d)}


def make_segmenter(model, vocab, args: argparse.Namespace, preset, common: dict):
    """The segmenter of a newer method; ``common`` = the shared overrides of ``segment_cmd``."""
    from tag2mask.methods.ovss2.segmenter import NewerOvssSegmenter

    return NewerOvssSegmenter(model, vocab, args.method, preset=preset, **common, **_overrides(args))
