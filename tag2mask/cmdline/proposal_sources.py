"""Mask-proposal sources from command-line options: shared by ``tag2mask seed`` and ``label --method fma``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["SUPERPIXELS", "proposal_kind", "build_source"]

SUPERPIXELS = ("slic", "felzenszwalb")


def proposal_kind(spec: str) -> str:
    """``sam`` | ``slic`` | ``felzenszwalb`` | ``files`` (a folder)."""
    if spec in ("sam",) + SUPERPIXELS:
        return spec
    if Path(spec).is_dir():
        return "files"
    raise ValueError(f"--proposals {spec!r}: not sam, slic, felzenszwalb or an existing folder of <name>.json files")


def build_source(args: argparse.Namespace, kind: str, device):
    """The proposal source for ``kind`` with the command-line settings."""
    if kind == "files":
        from tag2mask.proposals.rle_files import RLEFolderProposals

        return RLEFolderProposals(args.proposals)
    if kind in SUPERPIXELS:
        from tag2mask.proposals.superpixels import SuperpixelProposals, SuperpixelSettings

        given = {"n_segments": args.n_segments, "compactness": args.compactness, "scale": args.scale,
                 "min_size": args.min_size, "sigma": args.sigma}
        return SuperpixelProposals(kind, SuperpixelSettings(**{k: v for k, v in given.items() if v is not None}))
    from dataclasses import replace

    from tag2mask.proposals.sam import SAM_PRESETS, SamProposals, load_sam

    settings = SAM_PRESETS[args.sam_preset or "fma"]
    given = {"points_per_side": args.points_per_side, "points_per_batch": args.points_per_batch}
    settings = replace(settings, **{k: v for k, v in given.items() if v is not None})
    model = load_sam(args.sam_weights, device=device, allow_download=True if args.allow_download else None)
    return SamProposals(model, settings, weights=str(args.sam_weights))
