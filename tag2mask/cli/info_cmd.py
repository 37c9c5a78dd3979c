"""``tag2mask info``: describe a CLIP checkpoint without running it."""

from __future__ import annotations

import argparse

from tag2mask.cmdline.options import add_weights_options, record_given_options


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="print a CLIP checkpoint's architecture, parameter count, dtype and source format",
        description="Load CLIP weights (any supported format) on the CPU and describe them. Without --weights: "
        "the tiny CLIP shipped with tag2mask.",
    )
    add_weights_options(p)
    p.set_defaults(func=run)
    record_given_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from tag2mask.clip.loading import load_clip
    from tag2mask.cmdline.options import check_weights_options
    from tag2mask.clip.shipped import SHIPPED_WEIGHTS, TINY_CLIP_NOTE, is_shipped_tiny_clip

    check_weights_options(args)
    model = load_clip(args.weights or SHIPPED_WEIGHTS, allow_download=args.allow_download or None)
    dtypes = model.stored_dtypes
    cfg = model.config
    print(f"source:       {model.source_path}")
    print(f"format:       {model.source_format}")
    print(f"architecture: {cfg.describe()}")
    print(f"parameters:   {model.num_parameters():,} (image {sum(p.numel() for p in model.visual.parameters()):,})")
    print(f"stored dtype: {', '.join(dtypes)}")
    print(f"activation:   {cfg.activation}; context length {cfg.text.context_length}; vocab {cfg.text.vocab_size}")
    print(f"fingerprint:  {model.fingerprint}")
    if is_shipped_tiny_clip(model):
        print(f"note:         {TINY_CLIP_NOTE}")
    return 0
