"""CorrCLIP's command-line options (``--dino``, ``--dino-heads``, ``--regions``, ``--sam-weights``), defined once.

``segment --method corrclip`` (:mod:`.segment_cli`) and ``serve`` / ``demo`` (:mod:`.app`) add the same
options with the same types; only ``--regions DIR`` is ``segment``'s alone (a folder of region maps is
keyed by the file stem of each input image, which uploads and generated scenes do not have).
Imports no torch, so ``--help`` stays light.
"""

from __future__ import annotations

import argparse

from tag2mask.cmdline import option_types as ot
from tag2mask.cmdline.options import reject_options

__all__ = ["OPTION_DESTS", "REGION_SOURCES", "DEFAULT_DINO", "add_corrclip_options", "check_region_options"]

#: the option dests CorrCLIP adds
OPTION_DESTS = ("dino", "dino_heads", "regions", "sam_weights")
#: ``--regions`` values that compute regions from the image itself (no folder of pre-generated maps)
REGION_SOURCES = ("sam", "slic", "felzenszwalb")
#: the DINO used when ``--regions`` is given without ``--dino``: Meta's ViT-B/8 from the weights cache
DEFAULT_DINO = "dino_vitb8"


def add_corrclip_options(p: argparse.ArgumentParser, folders: bool = True) -> None:
    """Add CorrCLIP's options to ``p``; ``folders=False`` (``serve``, ``demo``): ``--regions`` names no folder."""
    p.add_argument("--dino", default=None,
                   help=f"corrclip: DINO weights: Meta's dino_vitb8_pretrain.pth, a Hugging Face facebook/dino-vitb8 "
                        f"folder, or the name {DEFAULT_DINO} (weights cache; downloaded only with --allow-download). "
                        f"Default with --regions: {DEFAULT_DINO}")
    p.add_argument("--dino-heads", type=ot.positive_int(1024), default=None,
                   help="corrclip: attention heads of a non-standard DINO file (default: width / 64, or the folder's config)")
    if folders:
        regions = ("corrclip (required): class-agnostic regions: a folder of <stem>.npz (instance_mask) / .png "
                   "id maps / .json RLE masks (the official default: pre-generated SAM2 masks), or sam (needs "
                   "--sam-weights), slic or felzenszwalb (scikit-image)")
    else:
        regions = ("corrclip: class-agnostic regions computed from each image: sam (needs --sam-weights), slic or "
                   "felzenszwalb (scikit-image). Given, CorrCLIP is offered (with --dino); without it, it is listed "
                   "as unavailable. A folder of region maps is a segment option only (it is keyed by file name)")
    p.add_argument("--regions", default=None, help=regions)
    p.add_argument("--sam-weights", default=None, help="corrclip --regions sam: a Hugging Face SamModel folder or hub id")


def check_region_options(args: argparse.Namespace, command: str, folders: bool = True) -> None:
    """Cheap checks before anything loads: ``--sam-weights`` only with ``--regions sam`` and required by it;
    ``folders=False``: ``--regions`` must be one of :data:`REGION_SOURCES`."""
    regions = getattr(args, "regions", None)
    if regions is None:
        return
    if not folders and regions not in REGION_SOURCES:
        raise ValueError(f"{command} --regions takes {', '.join(REGION_SOURCES)}, not {regions!r}: a folder of "
                         "region maps is keyed by each image's file name, which uploads and generated scenes do "
                         "not have (use tag2mask segment --regions DIR for such a folder)")
    if regions != "sam":
        reject_options(args, ("sam_weights",), f"to --regions {regions} (only to --regions sam)")
    elif not args.sam_weights:
        raise ValueError("--regions sam needs --sam-weights (a Hugging Face SamModel folder or hub id)")
