"""``tag2mask segment`` options and dispatch of the newer methods (SC-CLIP, PEARL, CorrCLIP).

Kept apart from :mod:`tag2mask.cli.segment_cmd` so that the methods of
:mod:`tag2mask.methods.ovss2` plug in with a few lines there; torch is imported only when a
segmenter is built.
"""

from __future__ import annotations

import argparse

from tag2mask.cli.common import given, reject_options

__all__ = ["METHODS", "OPTION_DESTS", "add_options", "check_options", "extra_settings", "get_preset", "load_vocab",
           "make_segmenter", "corrclip_warning"]

#: kept in step with tag2mask.methods.ovss2.presets.METHODS (importing it would load torch for --help)
METHODS = ("scclip", "pearl", "corrclip")
#: option dest -> the methods it applies to
_OWN = {"token_map": ("scclip",), "alpha_kk": ("pearl",), "tlp": ("pearl",), "tlp_grid": ("pearl",),
        "dino": ("corrclip",), "dino_heads": ("corrclip",), "regions": ("corrclip",), "sam_weights": ("corrclip",)}
OPTION_DESTS = tuple(_OWN)
#: options of the older methods that the newer ones do not take
_OLDER_ONLY = ("last_block", "compat", "pamr")

PRESET_ROWS = """\
  scclip     published  336         slide 224/112  40           off   fp16-rounded; LOF anomaly smoothing
  pearl      published  336         slide 224/112  40           off   fp16-rounded; TLP on, alpha_kk 0.08
  corrclip   published  336         slide 336/112  40           off   fp16-rounded; DINO + --regions; MetaCLIP B/16"""
#: what CorrCLIP's published numbers were produced with
METACLIP_HINT = ("CorrCLIP's published numbers use MetaCLIP ViT-B-16-quickgelu weights (open_clip 'metaclip_fullcc', "
                 "file b16_fullcc2.5b.pt) and DINO ViT-B/8")


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
    p.add_argument("--dino", default=None,
                   help="corrclip: DINO weights: Meta's dino_vitb8_pretrain.pth, a Hugging Face facebook/dino-vitb8 "
                        "folder, or the name dino_vitb8 (weights cache; downloaded only with --allow-download)")
    p.add_argument("--dino-heads", type=int, default=None,
                   help="corrclip: attention heads of a non-standard DINO file (default: width / 64, or the folder's config)")
    p.add_argument("--regions", default=None,
                   help="corrclip: class-agnostic regions: a folder of <stem>.npz (instance_mask) / .png id maps / "
                        ".json RLE masks (the official default: pre-generated SAM2 masks), or sam (needs "
                        "--sam-weights), slic or felzenszwalb (scikit-image)")
    p.add_argument("--sam-weights", default=None, help="corrclip --regions sam: a Hugging Face SamModel folder or hub id")


def check_options(args: argparse.Namespace) -> None:
    """Options typed for a method they do not apply to are errors, not silently ignored."""
    for dest, methods in _OWN.items():
        if args.method not in methods:
            reject_options(args, (dest,), f"to --method {args.method} (only to {', '.join(methods)})")
    if args.method in METHODS:
        reject_options(args, _OLDER_ONLY, f"to --method {args.method} (it has its own last block and refinement)")
    if args.method == "corrclip" and args.regions != "sam":
        reject_options(args, ("sam_weights",), f"to --regions {args.regions} (only to --regions sam)")


def extra_settings(args: argparse.Namespace, segmenter) -> dict:
    """The newer methods' entries of the settings guard: their options (only for them, so that older
    output folders still resume) and CorrCLIP's DINO fingerprint (a changed file is a changed setting)."""
    if args.method not in METHODS:
        return {}
    out = {d: getattr(args, d) for d in OPTION_DESTS}
    if getattr(segmenter, "dino", None) is not None:
        out["dino_weights"] = getattr(segmenter.dino, "fingerprint", None)
    return out


def get_preset(method: str, name: str):
    """The method's preset (:func:`tag2mask.methods.ovss2.presets.get_preset`)."""
    from tag2mask.methods.ovss2.presets import get_preset as ovss2_preset

    return ovss2_preset(method, name)


def _overrides(args: argparse.Namespace) -> dict:
    names = {"token_map": "scclip_token_map", "alpha_kk": "alpha_kk", "tlp": "tlp", "tlp_grid": "tlp_grid"}
    return {names[d]: getattr(args, d) for d in names if getattr(args, d) is not None and given(args, d)}


def load_vocab(spec: str, first_line_background):
    """``--classes``: CorrCLIP's ``"; "`` name files read as they are, everything else as usual."""
    from tag2mask.methods.corrclip.names import is_corrclip_nameset, read_corrclip_names
    from tag2mask.vocab.vocabulary import load_vocabulary

    if is_corrclip_nameset(spec):
        return read_corrclip_names(spec, first_line_background is not False)
    return load_vocabulary(spec, first_line_background=first_line_background)


def _region_source(args: argparse.Namespace, device):
    from tag2mask.methods.corrclip.regions import ProposalRegions, RegionFolder

    choice = args.regions
    if choice in ("slic", "felzenszwalb"):
        from tag2mask.proposals.superpixels import SuperpixelProposals

        return ProposalRegions(SuperpixelProposals(choice))
    if choice == "sam":
        if not args.sam_weights:
            raise ValueError("--regions sam needs --sam-weights (a Hugging Face SamModel folder or hub id)")
        from tag2mask.proposals.sam import SamGeneratorSettings, SamProposals, load_sam

        # CorrCLIP's dynamic SAM2 settings: 8 points per side, IoU and stability thresholds 0.4
        settings = SamGeneratorSettings(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4)
        sam = load_sam(args.sam_weights, device, allow_download=bool(getattr(args, "allow_download", False)) or None)
        return ProposalRegions(SamProposals(sam, settings, weights=str(args.sam_weights)))
    return RegionFolder(choice)


def corrclip_warning(model, preset) -> str | None:
    """A published CorrCLIP run with a CLIP that is not recognisably MetaCLIP B/16 gets this warning."""
    source = str(getattr(model, "source_path", "") or "").lower()
    arch = (model.visual.patch_size, model.visual.width, model.visual.num_blocks)
    if not str(preset.name).startswith("published") or ("metaclip" in source or "fullcc" in source) \
            and arch == (16, 768, 12):
        return None
    import sys

    text = f"{METACLIP_HINT}; this CLIP ({source or 'the shipped tiny CLIP'}) is not recognised as MetaCLIP B/16 " \
           "(by its file name and architecture): pass --weights b16_fullcc2.5b.pt to reproduce them"
    print(f"warning: {text}", file=sys.stderr)
    return text


def make_segmenter(model, vocab, args: argparse.Namespace, preset, common: dict):
    """The segmenter of a newer method; ``common`` = the shared overrides of ``segment_cmd``."""
    if args.method != "corrclip":
        from tag2mask.methods.ovss2.segmenter import NewerOvssSegmenter

        return NewerOvssSegmenter(model, vocab, args.method, preset=preset, **common, **_overrides(args))
    from tag2mask.methods.corrclip import CorrClipSegmenter
    from tag2mask.models.dino import load_dino

    if not args.regions:
        raise ValueError("--method corrclip needs --regions DIR|sam|slic|felzenszwalb")
    device = next(model.parameters()).device  # where the command put CLIP ('auto' is resolved by then)
    regions = _region_source(args, device)
    dino = load_dino(args.dino or "dino_vitb8", device, allow_download=bool(getattr(args, "allow_download", False))
                     or None, num_heads=args.dino_heads)
    return CorrClipSegmenter(model, vocab, dino, regions=regions, preset=preset, **common)
