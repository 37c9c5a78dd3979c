"""``tag2mask label --method fma``: FMA-WSSS seeds from learned prompts (the FMA parts of ``label``).

Per image: CAMs of the image's labels from the prompts of ``--prompts RUN`` with that stage's CAA
(:class:`tag2mask.methods.fma.inference.FMACams`), then either SAM-based seeding over mask proposals
(``--proposals sam | slic | felzenszwalb | DIR``, :mod:`tag2mask.proposals`) or plain CAM labels
(``--proposals none``: background ``(1 - max score)^alpha``). Output layout as CLIP-ES's:
``masks/<name>.png``, ``cams/<name>.npz`` (``keys``, ``cams`` (K, H, W) float16 scores), optional
``arrays/`` and ``proposals/``, ``run.json``, ``manifest.jsonl``, ``logs/``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any, Callable, NamedTuple

from tag2mask.cli.common import reject_options

__all__ = ["add_fma_options", "check_fma_options", "FMA_ONLY", "ItemsAPI", "run_fma_label"]


class ItemsAPI(NamedTuple):
    """``label``'s item readers: open the data set, item keys, an item's description and its input state."""

    open_items: Callable[..., Any]
    item_keys: Callable[[Any], list]
    describe: Callable[[Any, int], str]
    source: Callable[[Any, int], dict]

#: options only ``--method fma`` uses (so they are errors with CLIP-ES)
FMA_ONLY = ("prompts", "proposals", "alpha", "sam_weights", "sam_preset", "points_per_side", "points_per_batch",
            "n_segments", "compactness", "scale", "min_size", "sigma", "save_proposals")
#: CLIP-ES options that do not apply to FMA-WSSS
_CLIP_ES_ONLY = ("refine", "box_threshold", "bg_power", "confidence", "template", "scales", "flip", "compat", "classes",
                 "precision")


def add_fma_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("FMA-WSSS (--method fma): seeds from learned prompts, see docs/fma.md")
    g.add_argument("--prompts", default=None, metavar="RUN",
                   help="a `tag2mask train fma` run folder (or its prompts.safetensors); its classes, CLIP, CAA and "
                        "alpha are used")
    g.add_argument("--proposals", default=None,
                   help="sam | slic | felzenszwalb | a folder of <name>.json COCO-RLE masks | none (plain CAM labels); "
                        "default none. FMA-WSSS's seeds use sam")
    g.add_argument("--alpha", type=float, default=None,
                   help="background score (1 - max)^alpha (default: the run's stage, VOC 0.6 cls / 0.7 seg)")
    g.add_argument("--save-proposals", action="store_true", help="also write computed proposals to OUT/proposals/<name>.json")
    g.add_argument("--sam-weights", default=None, help="--proposals sam: a Hugging Face SamModel folder or hub id")
    g.add_argument("--sam-preset", default=None, choices=("fma", "sam"),
                   help="--proposals sam: fma (FMA-WSSS's level-aware generator, default) or sam (stock)")
    g.add_argument("--points-per-side", type=int, default=None, help="--proposals sam: point grid per side (32)")
    g.add_argument("--points-per-batch", type=int, default=None, help="--proposals sam: points per decoder call (64)")
    g.add_argument("--n-segments", type=int, default=None, help="--proposals slic: about this many superpixels (100)")
    g.add_argument("--compactness", type=float, default=None, help="--proposals slic: colour vs space (10)")
    g.add_argument("--scale", type=float, default=None, help="--proposals felzenszwalb: segment scale (100)")
    g.add_argument("--min-size", type=int, default=None, help="--proposals felzenszwalb: minimum segment size (50)")
    g.add_argument("--sigma", type=float, default=None, help="--proposals slic/felzenszwalb: smoothing (0.8)")


def check_fma_options(args: argparse.Namespace) -> None:
    """FMA options are errors without ``--method fma``; CLIP-ES options are errors with it."""
    if args.method != "fma":
        reject_options(args, FMA_ONLY, f"to --method {args.method} (only to --method fma)")
        return
    reject_options(args, _CLIP_ES_ONLY, "to --method fma (the prompts run fixes the classes, CAA and numerics; "
                                        "seeds come from --proposals)")
    if args.prompts is None:
        raise ValueError("--method fma needs --prompts RUN (a `tag2mask train fma` run folder)")
    if args.labels is not None:
        reject_options(args, ("split",), "with --labels (the label file lists the images)")
    kind = _proposal_kind(args)
    if kind != "sam":
        reject_options(args, ("sam_weights", "sam_preset", "points_per_side", "points_per_batch"),
                       f"to --proposals {args.proposals or 'none'} (only to sam)")
    if kind != "slic":
        reject_options(args, ("n_segments", "compactness"), f"to --proposals {args.proposals or 'none'} (only to slic)")
    if kind != "felzenszwalb":
        reject_options(args, ("scale", "min_size"), f"to --proposals {args.proposals or 'none'} (only to felzenszwalb)")
    if kind not in ("slic", "felzenszwalb"):
        reject_options(args, ("sigma",), f"to --proposals {args.proposals or 'none'} (only to slic, felzenszwalb)")
    if kind in ("none", "files"):
        reject_options(args, ("save_proposals",), f"to --proposals {args.proposals or 'none'} (nothing is computed)")
    if kind == "sam" and not args.sam_weights:
        raise ValueError("--proposals sam needs --sam-weights (a Hugging Face SamModel folder or hub id); "
                         "or use --proposals slic, which needs no model")
    if args.alpha is not None and not args.alpha > 0:
        raise ValueError(f"--alpha must be > 0, got {args.alpha}")


def _proposal_kind(args: argparse.Namespace) -> str:
    from tag2mask.cli.seed_cmd import proposal_kind

    spec = args.proposals or "none"
    return "none" if spec == "none" else proposal_kind(spec)


def _load_model(args: argparse.Namespace, config, ctx, meta: dict):
    """The run's CLIP (or ``--weights``, which must be the same model) with the learned prompts."""
    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.numerics import NUMERICS
    from tag2mask.runtime import resolve_device
    from tag2mask.training.fma_task import build_model

    recorded = (meta.get("clip") or {})
    weights = args.weights or recorded.get("weights")
    if not weights:
        raise ValueError(f"--prompts {args.prompts}: the run does not name its CLIP weights; pass --weights")
    if args.weights is None and not Path(weights).exists():
        raise FileNotFoundError(f"--prompts {args.prompts} was trained with the CLIP {weights}, which is not there "
                                "any more; pass --weights with the same model")
    numerics = NUMERICS[config.stage.numerics]
    clip = load_clip(weights, device=resolve_device(args.device), round_fp16_weights=numerics.round_weights_fp16,
                     allow_download=True if args.allow_download else None)
    expected = recorded.get("fingerprint")
    if expected and getattr(clip, "fingerprint", None) and clip.fingerprint != expected:
        raise ValueError(f"--weights {weights} is not the CLIP the prompts of {args.prompts} were learned on "
                         f"(fingerprint {clip.fingerprint}, the run recorded {expected})")
    return clip, build_model(config, clip, ctx)


class _FMALabeller:
    """``process_fn`` of the runner: one sample -> seed mask, CAMs (and arrays / proposals), atomically."""

    def __init__(self, args, cams, proposals, alpha: float, class_names, out: Path, image_root: Path) -> None:
        self.args, self.cams, self.proposals, self.alpha = args, cams, proposals, alpha
        self.class_names, self.out, self.image_root = list(class_names), out, image_root

    def __call__(self, sample) -> Any:
        import numpy as np
        from PIL import Image

        from tag2mask.data.images import fit_max_pixels, load_image
        from tag2mask.jobs.runner import ItemError, ItemOutput
        from tag2mask.localization.labels import cams_to_labels
        from tag2mask.proposals.base import ProposalError
        from tag2mask.proposals.seeding import seed_from_proposals

        args = self.args
        if not sample.label_ids:
            raise ItemError("labels", f"{sample.image_path}: empty label list; every image needs at least one class name")
        image = load_image(sample.image_path, max_pixels=args.max_decode_pixels)
        width, height = image.size
        info: dict[str, Any] = {"labels": [self.class_names[k] for k in sample.label_ids], "size": [height, width]}
        try:
            info["image"] = Path(sample.image_path).resolve().relative_to(self.image_root.resolve()).as_posix()
        except ValueError:
            info["image"] = str(sample.image_path)
        w, h = fit_max_pixels(width, height, args.max_pixels)
        if (w, h) != (width, height):
            if args.max_pixels_policy == "refuse":
                raise ItemError("too_large", f"{sample.image_path}: image is {width}x{height} = {width * height:,} pixels, "
                                f"more than --max-pixels {args.max_pixels:,}; raise --max-pixels or use "
                                "--max-pixels-policy downscale")
            image = image.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
            info["processed_size"] = [h, w]
        result = self.cams(image, sample.label_ids, keep_arrays=args.save_arrays)
        outputs: list[Path] = []
        if self.proposals is None:
            label = cams_to_labels(result.cams, result.keys, bg_power=self.alpha)
        else:
            rgb = np.array(image.convert("RGB"), dtype=np.uint8)
            try:
                props = self.proposals(rgb, sample.name)
            except ProposalError as e:
                raise ItemError("proposals", str(e)) from e
            if props.image_size != rgb.shape[:2]:
                raise ItemError("proposals", f"{sample.name}: proposals are {props.image_size} but the image is "
                                f"{rgb.shape[:2]}")
            label = seed_from_proposals(result.refined, result.keys, props, self.alpha).seed
            info["proposals"] = len(props)
            if args.save_proposals:
                from tag2mask.proposals.rle_files import write_proposals_json

                prop_path = self.out / "proposals" / f"{sample.name}.json"
                write_proposals_json(prop_path, props)
                outputs.append(prop_path)
        if (w, h) != (width, height):
            label = np.asarray(Image.fromarray(np.asarray(label, np.uint8)).resize((width, height), Image.NEAREST))
        return ItemOutput(outputs + self._write(sample.name, label, result), info)

    def _write(self, stem: str, label, result) -> list[Path]:
        import numpy as np

        from tag2mask.io.atomic import atomic_path
        from tag2mask.io.palette import save_label_png

        mask_path, cam_path = self.out / "masks" / f"{stem}.png", self.out / "cams" / f"{stem}.npz"
        save_label_png(mask_path, label)
        with atomic_path(cam_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, keys=result.keys, cams=result.cams)
        written = [mask_path, cam_path]
        if self.args.save_arrays:
            arr_path = self.out / "arrays" / f"{stem}.npz"
            with atomic_path(arr_path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **result.arrays)
            written.append(arr_path)
        return written


def run_fma_label(args: argparse.Namespace, items_api: "ItemsAPI") -> int:
    """``tag2mask label --method fma`` (options already checked by :func:`check_fma_options`).

    ``items_api``: how ``label`` reads its items (passed in, so this module does not import ``label_cmd``).
    """
    import torch

    import tag2mask
    from tag2mask.cli.common import toy_model_warning
    from tag2mask.cli.seed_cmd import build_source
    from tag2mask.evaluation.miou import DEFAULT_MIOU_RULE
    from tag2mask.jobs.distributed import device_for_rank
    from tag2mask.jobs.runner import JobOptions, print_summary, process_exit_code, run_items
    from tag2mask.methods.fma.inference import FMACams
    from tag2mask.training.fma_task import load_prompts

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    out = Path(args.out)
    config, ctx, meta = load_prompts(args.prompts)
    class_names = list(config.class_names)
    args.classes = config.preset  # named in the vocabulary messages of the shared item readers
    try:
        items = items_api.open_items(args, class_names)
    except ValueError as exc:
        if "does not know" not in str(exc):
            raise
        raise ValueError(f"the image labels must be classes of the prompts run {args.prompts} "
                         f"({', '.join(class_names[:6])}{', ...' if len(class_names) > 6 else ''}): {exc}") from None
    args.device = device_for_rank(args.device)
    clip, model = _load_model(args, config, ctx, meta)
    warning = toy_model_warning(clip, [args.images])
    cams = FMACams(model, config.stage.caa)
    kind = _proposal_kind(args)
    proposals = None if kind == "none" else build_source(args, kind, next(clip.parameters()).device)
    alpha = args.alpha if args.alpha is not None else config.stage.bg_alpha
    image_root = Path(items.image_dir) if hasattr(items, "image_dir") else Path(items.root) / "JPEGImages"
    settings = {
        "method": "fma", "prompts": str(Path(args.prompts).resolve()), "weights": clip.fingerprint,
        "proposals": proposals.describe() if proposals is not None else "none", "alpha": alpha,
        "save_arrays": args.save_arrays, "save_proposals": args.save_proposals, "max_pixels": args.max_pixels,
        "max_pixels_policy": args.max_pixels_policy,
    }
    record = {
        "tag2mask": tag2mask.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "command": "label", "method": "fma", "settings": settings, "fma": config.to_dict(),
        "miou_rule": DEFAULT_MIOU_RULE, "classes": class_names, "weights": getattr(clip, "source_path", None),
        "device": str(next(clip.parameters()).device), "warnings": [warning] if warning else [],
    }

    def finalize(run_dir: Path, summary) -> None:
        if args.coco_json:
            from tag2mask.jobs.coco_export import write_coco_from_manifest

            record["coco_json"] = write_coco_from_manifest(run_dir, class_names, run_dir / "annotations.json")

    labeller = _FMALabeller(args, cams, proposals, alpha, class_names, out, image_root)
    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="label fma", unit="img")
    summary = run_items(items, labeller, out, settings, options, keys=items_api.item_keys(items),
                        preflight_errors=getattr(items, "errors", []), describe=lambda i: items_api.describe(items, i),
                        run_record=record, finalize=finalize, source_of=lambda i: items_api.source(items, i))
    if not args.quiet or summary.failed:
        print_summary(summary, out, "label")
    return process_exit_code(summary)
