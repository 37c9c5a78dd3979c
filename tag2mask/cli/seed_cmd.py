"""``tag2mask seed``: any folder of CAMs + mask proposals -> seed masks (FMA-WSSS's SAM seeding)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

from tag2mask.cmdline.options import add_device_option, add_run_options
from tag2mask.cmdline.proposal_sources import build_source, proposal_kind
from tag2mask.cmdline import option_types as ot

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: refuse images above this many pixels before decoding (same guard as `tag2mask label`)
MAX_DECODE_PIXELS = 100_000_000

# options that only apply to one kind of proposals: name -> kinds it applies to
_SPECIFIC = {
    "sam_weights": ("sam",), "sam_preset": ("sam",), "points_per_side": ("sam",), "points_per_batch": ("sam",),
    "allow_download": ("sam",),
    "n_segments": ("slic",), "compactness": ("slic",), "scale": ("felzenszwalb",), "min_size": ("felzenszwalb",),
    "sigma": ("slic", "felzenszwalb"),
    "save_proposals": ("sam", "slic", "felzenszwalb"),
}


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "seed",
        help="seed masks from any CAMs + mask proposals (SAM, superpixels or your own masks), FMA-WSSS style",
        description=(
            "Turn a folder of CAM files (cams/<name>.npz with 'keys' (K,) class ids and 'cams' (K, h, w), as "
            "`tag2mask label` writes them, or from any other method) into seed masks: every mask proposal takes "
            "one label from the mean CAM inside it (FMA-WSSS's SAM-based seeding). Writes OUT/masks/<name>.png "
            "(palette PNG: 0 background, class id + 1; 255 only with --uncovered ignore), run.json, "
            "manifest.jsonl and logs/."
        ),
        epilog=(
            "examples:\n"
            "  tag2mask seed run1 --images photos --proposals slic --out seeds_slic\n"
            "  tag2mask seed run1/cams --images VOC2012/JPEGImages --proposals sam --sam-weights ./sam-vit-huge --out seeds\n"
            "  tag2mask seed my_cams --images imgs --proposals amg_out/ --alpha 0.7 --out seeds   # SAM amg.py --convert-to-rle output\n"
            "PROPOSALS: sam (Hugging Face SamModel, FMA-WSSS's level-aware generator by default), slic or felzenszwalb\n"
            "(scikit-image superpixels, no model), or a folder with one COCO-RLE JSON per image (<name>.json).\n"
            "exit code: 0 all items ok, 1 some items failed (listed in OUT/manifest.jsonl), 2 bad arguments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("cams", metavar="CAMS_DIR", help="a run folder of `tag2mask label` (its cams/ is used) or a folder of CAM .npz files")
    p.add_argument("--images", required=True, help="image folder; the image of cams/<name>.npz is <name>.jpg/.png/...")
    p.add_argument("--proposals", required=True, help="sam | slic | felzenszwalb | a folder of <name>.json COCO-RLE files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--alpha", type=ot.finite_float(0, 100, lo_open=True), default=0.6, help="background score (1 - max class score)^alpha (default 0.6: FMA-WSSS VOC coarse seeds; 0.7 fine)")
    p.add_argument("--uncovered", default="background", choices=("background", "ignore"),
                   help="label of pixels no proposal covers: background (default, as FMA-WSSS) or ignore (255)")
    p.add_argument("--save-proposals", action="store_true", help="also write the computed proposals to OUT/proposals/<name>.json (reusable as --proposals DIR)")
    g = p.add_argument_group("SAM (--proposals sam)")
    g.add_argument("--sam-weights", default=None, help="a Hugging Face SamModel folder, or a hub id (facebook/sam-vit-huge) found in the local HF cache")
    g.add_argument("--allow-download", action="store_true", help="allow downloading --sam-weights from the Hugging Face hub")
    g.add_argument("--sam-preset", default=None, choices=("fma", "sam"), help="generator settings: fma (FMA-WSSS's level-aware generator, default) or sam (stock SAM automatic masks)")
    g.add_argument("--points-per-side", type=ot.positive_int(1024), default=None, help="point grid per side (default: the preset's, 32)")
    g.add_argument("--points-per-batch", type=ot.positive_int(ot.MAX_BATCH), default=None, help="points per SAM decoder call (default: the preset's, 64; more is faster on a GPU, uses more memory)")
    g = p.add_argument_group("superpixels (--proposals slic | felzenszwalb)")
    g.add_argument("--n-segments", type=ot.positive_int(1_000_000), default=None, help="slic: approximate number of superpixels (default: built-in 100)")
    g.add_argument("--compactness", type=ot.finite_float(0, 10_000, lo_open=True), default=None, help="slic: colour vs space trade-off (default: built-in 10)")
    g.add_argument("--scale", type=ot.finite_float(0, 100_000, lo_open=True), default=None, help="felzenszwalb: larger means larger segments (default: built-in 100)")
    g.add_argument("--min-size", type=ot.non_negative_int(10_000_000), default=None, help="felzenszwalb: minimum segment size in pixels (default: built-in 50)")
    g.add_argument("--sigma", type=ot.finite_float(0, 100), default=None, help="Gaussian smoothing before segmenting (default: built-in 0.8)")
    p.add_argument("--max-decode-pixels", type=ot.positive_int(ot.MAX_PIXELS), default=MAX_DECODE_PIXELS,
                   help=f"images above this many pixels are refused before decoding (default {MAX_DECODE_PIXELS:,})")
    add_device_option(p)
    add_run_options(p)
    p.set_defaults(func=run)
    return p


def _check_options(args: argparse.Namespace, kind: str) -> None:
    """Options that do not apply to the chosen proposals are errors, not silently ignored."""
    for name, kinds in _SPECIFIC.items():
        value = getattr(args, name)
        if value not in (None, False) and kind not in kinds:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to --proposals {args.proposals} (only to {', '.join(kinds)})")
    if kind == "sam" and not args.sam_weights:
        raise ValueError("--proposals sam needs --sam-weights (a Hugging Face SamModel folder or hub id); "
                         "or use --proposals slic, which needs no model")
    if not 0 < args.alpha:
        raise ValueError(f"--alpha must be > 0, got {args.alpha}")


def cams_folder(path: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"CAM folder not found: {root}")
    return root / "cams" if (root / "cams").is_dir() else root


def list_cam_keys(folder: Path) -> list[str]:
    """Item names: CAM files relative to ``folder`` without ``.npz`` (sub-folders kept), sorted."""
    keys = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.npz") if p.is_file())
    if not keys:
        raise ValueError(f"{folder}: no CAM files (*.npz) found")
    return keys


def find_image(image_dir: Path, key: str) -> Path:
    """The image of item ``key`` (``<key>.<ext>``, any common extension, any case)."""
    base = image_dir / key
    candidates = [base.with_name(base.name + s) for s in IMAGE_SUFFIXES]
    candidates += [base.with_name(base.name + s.upper()) for s in IMAGE_SUFFIXES]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise FileNotFoundError(f"no image for {key!r} in {image_dir} (looked for {key}{{{','.join(IMAGE_SUFFIXES)}}})")
    return found[0]


def read_cam_file(path: Path):
    """(keys (K,) int64, cams (K, h, w) float32) from a CAM .npz, never unpickling."""
    import numpy as np

    from tag2mask.jobs.runner import ItemError

    from tag2mask.io.budget import npz_headers

    try:
        heads = npz_headers(path)  # sizes and ratios from the headers, before any array is inflated
        if "cams" in heads and len(heads["cams"][0]) != 3:
            raise ItemError("cams", f"{path}: 'cams' must be (K, h, w), got shape {heads['cams'][0]}")
        with np.load(path, allow_pickle=False) as z:
            if "keys" not in z.files or "cams" not in z.files:
                raise ItemError("cams", f"{path}: needs arrays 'keys' (K,) and 'cams' (K, h, w); found {sorted(z.files)}")
            keys, cams = z["keys"], z["cams"]
    except ItemError:
        raise
    except Exception as e:  # truncated zip, object arrays, not an npz ...
        raise ItemError("cams", f"{path}: not a readable CAM file ({type(e).__name__}: {e})") from e
    keys = np.asarray(keys).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0] or min(cams.shape[1:], default=1) < 1:
        raise ItemError("cams", f"{path}: 'cams' must be (K, h, w) with K = {keys.shape[0]} keys, got shape {cams.shape}")
    if not np.issubdtype(cams.dtype, np.floating) or (keys.size and not np.issubdtype(keys.dtype, np.integer)):
        raise ItemError("cams", f"{path}: 'cams' must be floating point and 'keys' integer class ids "
                        f"(got {cams.dtype} and {keys.dtype})")
    if keys.size and (keys.min() < 0 or keys.max() > 253):
        raise ItemError("cams", f"{path}: class ids must be 0..253 (label = id + 1 < 255), got {keys.min()}..{keys.max()}")
    cams = cams.astype(np.float32)
    if not np.isfinite(cams).all():
        raise ItemError("cams", f"{path}: CAMs contain NaN or infinite values")
    return keys.astype(np.int64), cams


class _Seeder:
    """``process_fn`` of the runner: one CAM file -> seed PNG (and proposals), written atomically."""

    def __init__(self, args, source, cam_dir: Path, image_dir: Path, out: Path) -> None:
        self.args, self.source = args, source
        self.cam_dir, self.image_dir, self.out = cam_dir, image_dir, out
        self.uncovered = 0 if args.uncovered == "background" else 255

    def __call__(self, key: str) -> Any:
        from tag2mask.data.images import load_image_array
        from tag2mask.io.palette import save_label_png
        from tag2mask.jobs.runner import ItemError, ItemOutput
        from tag2mask.proposals.base import ProposalError
        from tag2mask.proposals.rle_files import write_proposals_json
        from tag2mask.proposals.seeding import seed_from_proposals

        class_ids, cams = read_cam_file(self.cam_dir / f"{key}.npz")
        image_path = find_image(self.image_dir, key)
        image = load_image_array(image_path, max_pixels=self.args.max_decode_pixels)
        try:
            proposals = self.source(image, key)
        except ProposalError as e:
            raise ItemError("proposals", str(e)) from e
        if proposals.image_size != image.shape[:2]:
            raise ItemError("proposals", f"{key}: proposals are {proposals.image_size} but {image_path} is {image.shape[:2]}")
        result = seed_from_proposals(cams, class_ids, proposals, self.args.alpha, self.uncovered)
        outputs = []
        if self.args.save_proposals:
            prop_path = self.out / "proposals" / f"{key}.json"
            write_proposals_json(prop_path, proposals)
            outputs.append(prop_path)
        mask_path = self.out / "masks" / f"{key}.png"
        save_label_png(mask_path, result.seed)
        outputs.append(mask_path)
        info = {"image": str(image_path), "size": list(image.shape[:2]), "classes": class_ids.tolist(),
                "proposals": len(proposals)}
        return ItemOutput(outputs, info)


def run(args: argparse.Namespace) -> int:
    import torch

    from tag2mask.version import __version__
    from tag2mask.jobs.runner import JobOptions, print_summary, process_exit_code, run_items
    from tag2mask.runtime import resolve_device

    kind = proposal_kind(args.proposals)
    _check_options(args, kind)
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    cam_dir = cams_folder(args.cams)
    image_dir = Path(args.images)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    keys = list_cam_keys(cam_dir)
    device = resolve_device(args.device)
    source = build_source(args, kind, device)
    out = Path(args.out)
    settings = {
        "cams": str(cam_dir.resolve()), "images": str(image_dir.resolve()), "alpha": args.alpha,
        "uncovered": args.uncovered, "save_proposals": args.save_proposals, "proposals": source.describe(),
    }
    record = {
        "tag2mask": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "command": "seed", "settings": settings, "device": str(device),
    }
    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="seed", unit="img")
    seeder = _Seeder(args, source, cam_dir, image_dir, out)
    summary = run_items(keys, seeder, out, settings, options, keys=keys, run_record=record)
    if not args.quiet or summary.failed:
        print_summary(summary, out, "seed")
    return process_exit_code(summary)

