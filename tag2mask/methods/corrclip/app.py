"""CorrCLIP in ``tag2mask serve`` and ``tag2mask demo``: its options there and its demo predictor.

The registry's ``inputs`` hooks (:data:`tag2mask.methods.registry.INPUT_HOOKS`) and ``demo`` factory of
``corrclip``. ``--dino`` and ``--regions slic|felzenszwalb|sam`` are start-up options (a web request never
names a server file): the DINO and the region source are built once, then handed to every CorrCLIP
segmenter the server or the demo makes. Imports no torch at module level (the parsers read it).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional, Sequence

from tag2mask.cmdline.options import reject_options
from tag2mask.methods.corrclip.options import (
    DEFAULT_DINO,
    REGION_SOURCES,
    add_corrclip_options,
    check_region_options,
)

__all__ = ["add_app_options", "check_app_options", "app_inputs", "demo_predictors"]


def add_app_options(p: argparse.ArgumentParser) -> None:
    """``--dino``, ``--dino-heads``, ``--regions slic|felzenszwalb|sam``, ``--sam-weights`` (``segment``'s definitions)."""
    add_corrclip_options(p, folders=False)


def check_app_options(args: argparse.Namespace, command: str) -> None:
    """Before the model loads: DINO options need ``--regions``; ``--regions`` names no folder here."""
    if getattr(args, "regions", None) is None:
        reject_options(args, ("dino", "dino_heads", "sam_weights"),
                       f"without --regions {'|'.join(REGION_SOURCES)} (CorrCLIP needs a region source too)")
        return
    check_region_options(args, command, folders=False)


def app_inputs(args: argparse.Namespace, model: Any) -> Optional[dict[str, Any]]:
    """``{"dino": DinoViT, "regions": region source}`` on the model's device, or ``None`` without ``--regions``
    (CorrCLIP is then not offered). ``--dino`` defaults to :data:`DEFAULT_DINO` as in ``segment``."""
    if getattr(args, "regions", None) is None:
        return None
    from tag2mask.methods.corrclip.segmenter import region_source
    from tag2mask.models.dino import load_dino

    device = next(model.parameters()).device
    allow = bool(getattr(args, "allow_download", False)) or None
    dino = load_dino(args.dino or DEFAULT_DINO, device, allow_download=allow, num_heads=args.dino_heads)
    return {"dino": dino, "regions": region_source(args.regions, device, args.sam_weights, allow)}


def demo_predictors(model: Any, vocab: Any, names: Sequence[str], options: dict[str, Any]
                    ) -> dict[str, Callable[[Any], Any]]:
    """``{"corrclip": predict(image, tag_ids) -> (H, W) uint8}``: whole image at its own size, the tags unused,
    ``options["templates"]`` as prompts, the DINO and regions of ``options["inputs"]["corrclip"]``."""
    from tag2mask.methods.corrclip.segmenter import corrclip_predictor

    inputs = (options.get("inputs") or {}).get("corrclip")
    if inputs is None:
        raise ValueError("corrclip needs a DINO ViT (--dino) and region masks (--regions slic|felzenszwalb|sam)")
    preds = {}
    for name in names:
        seg = corrclip_predictor(model, vocab, "corrclip", templates=options["templates"], short_side=None,
                                 mode="whole", **inputs)
        preds[name] = lambda image, ids, seg=seg: seg.predict(image).label
    return preds
