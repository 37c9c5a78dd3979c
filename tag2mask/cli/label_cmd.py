"""``tag2mask label``: pseudo-masks for images with image-level labels (CLIP-ES)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

from tag2mask.cmdline.options import (
    add_device_option,
    add_overlap_options,
    add_precision_option,
    add_run_options,
    add_weights_options,
    check_overlap_options,
    check_weights_options,
    record_given_options,
    reject_options,
)
from tag2mask.cmdline.items import describe, item_keys, open_items, source
from tag2mask.methods import registry

REFINERS = ("crf", "pamr", "none")
#: default --max-pixels: 1 MP (about 1000x1000). CLIP-ES's attention affinity is quadratic in the
#: number of 16x16 patches (1 MP = 3,900 tokens -> 61 MB per attention map, 4 MP -> 1 GB), so larger
#: images would exhaust memory; VOC / COCO images (at most 640x640 = 0.41 MP) are never resized.
DEFAULT_MAX_PIXELS = 1_000_000
#: default --max-decode-pixels: the decoder's own decompression-bomb limit (tag2mask.data.images)
MAX_DECODE_PIXELS = 100_000_000


def _positive_int(text: str) -> int:
    try:
        value = int(float(text))  # accept 4e6 as well as 4000000
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "label",
        help="pseudo-masks from image-level labels with CLIP-ES (training-free)",
        description=(
            "Write a pseudo-mask (palette PNG: 0 background, class id + 1, 255 ignore), the refined CAMs "
            "(npz) and a run record for every image. Labels come from a JSON/CSV file, or for a VOC root "
            "from Annotations/*.xml, or for a COCO root (JPEGImages/ + SegmentationClass/) from the split "
            "file's '<image id> <class id> ...' lines, as the official scripts read them."
        ),
        epilog=(
            "examples:\n"
            "  tag2mask label photos/ --labels tags.json --classes classes.txt --out run1\n"
            "  tag2mask label VOCdevkit/VOC2012 --split train --classes voc --weights ViT-B-16.pt --refine crf --out seeds\n"
            "  tag2mask label coco2014 --split train --classes coco --weights ViT-B-16.pt --refine crf --out coco_seeds\n"
            "  tag2mask label VOCdevkit/VOC2012 --split train_aug --method fma --prompts runs/cls --proposals slic --out seeds\n"
            "LABELS formats: JSON {\"img.jpg\": [\"cat\", \"dog\"]} or CSV with header 'image,labels' and ';'-separated names.\n"
            "scale out: torchrun --nproc-per-node 4 -m tag2mask label ... (see docs/batch_jobs.md)\n"
            "exit code: 0 all items ok, 1 some items failed (listed in OUT/manifest.jsonl), 2 bad arguments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", help="a folder of images, a VOC root (JPEGImages + Annotations) or a COCO root "
                   "(JPEGImages + SegmentationClass + split files)")
    p.add_argument("--labels", default=None, help="JSON or CSV label file (omit for a VOC or COCO root)")
    p.add_argument("--split", default="train", help="split of a VOC root (ImageSets/Segmentation/SPLIT.txt) or a COCO "
                   "root (SPLIT.txt or a path: '<image id> <class id> ...' lines, ids 0-based) (default: train)")
    p.add_argument(
        "--classes",
        default="voc",
        help="vocabulary and preset: voc, coco, synth (each sets the official class prompts, background words, "
        "box threshold and numerics of that setting), a name-set file (one class per line, comma-separated "
        "synonyms), or an inline list 'cat, dog; background: sky, grass' (these use the voc settings) (default: voc)",
    )
    hooks = registry.commands("label")
    p.add_argument("--method", default="clip-es", choices=registry.label_methods(),
                   help="clip-es (training-free, default)" + "".join(f" or {c.name} ({c.help})" for _, c in hooks))
    p.add_argument("--out", required=True, help="output folder (masks/, cams/, arrays/, run.json, manifest.jsonl, logs/)")
    p.add_argument("--refine", default="pamr", choices=REFINERS,
                   help="post-processing: crf (dense CRF, extra 'crf'), pamr or none (default: pamr)")
    p.add_argument("--box-threshold", type=float, default=None,
                   help="CAM box threshold lambda (default: the preset's, 0.4 for voc, 0.7 for coco)")
    p.add_argument("--bg-power", type=float, default=1.0,
                   help="with --refine pamr or none: background score (1 - max CAM)^p (default: 1)")
    p.add_argument("--confidence", type=float, default=0.95, help="with --refine crf: pixels with max probability below this become 255 (default 0.95; 0 disables)")
    p.add_argument("--template", default=None, help="prompt template with one {} (default: the preset's, 'a clean origami {}.' "
                   "for voc/coco); tag2mask prompts select ranks candidates on your images")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time scales averaged (default: 1.0, as the official code)")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped views")
    p.add_argument("--no-compat", dest="compat", action="store_false", help="plain float32 numerics (no fp16 rounding of "
                   "weights and positional embeddings) and no CRF image quirk; default: the official ones")
    p.add_argument("--save-arrays", action="store_true", help="also save every intermediate array (arrays/<stem>.npz), as in the golden fixtures")
    p.add_argument(
        "--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
        help=f"largest image (width*height) processed at full size (default {DEFAULT_MAX_PIXELS:,}; CLIP-ES memory "
        "grows with the square of the pixel count). Larger images are downscaled to fit, keeping the aspect "
        "ratio, and their mask is scaled back (nearest) to the original size; see --max-pixels-policy",
    )
    p.add_argument(
        "--max-pixels-policy", default="downscale", choices=("downscale", "refuse"),
        help="what to do with an image above --max-pixels: downscale or refuse it with an error record "
        "(default: downscale)",
    )
    p.add_argument(
        "--max-decode-pixels", type=_positive_int, default=MAX_DECODE_PIXELS,
        help=f"images above this many pixels are refused before decoding (decompression-bomb guard; default {MAX_DECODE_PIXELS:,})",
    )
    p.add_argument("--coco-json", action="store_true", help="also write OUT/annotations.json (COCO RLE, merged over ranks) at the end")
    add_weights_options(p)
    add_device_option(p)
    add_precision_option(p)
    add_run_options(p)
    add_overlap_options(p, "decode images and refine / write masks")
    for _, command in hooks:  # each method's own options (errors with the other methods)
        _label_hook(command.name).add_label_options(p)
    p.set_defaults(func=run)
    record_given_options(p)
    return p


def _label_hook(method: str):
    """The module of ``label --method METHOD`` (``add_label_options / check_label_options / run_label``)."""
    import importlib

    return importlib.import_module(registry.method_of_command("label", method).module)


def check_options(args: argparse.Namespace) -> None:
    """Options that do not apply to the chosen refinement / input are errors, not silently ignored."""
    for _, command in registry.commands("label"):
        _label_hook(command.name).check_label_options(args)
    check_overlap_options(args)
    if args.method != "clip-es":
        return
    check_weights_options(args)
    if args.refine != "crf":
        reject_options(args, ("confidence",), f"with --refine {args.refine} (it masks low-confidence CRF pixels)")
    else:
        reject_options(args, ("bg_power",), "with --refine crf (the CRF computes its own background)")
    if args.labels is not None:
        reject_options(args, ("split",), "with --labels (the label file lists the images)")


def _settings(args: argparse.Namespace, model) -> dict:
    keys = ("method", "classes", "refine", "box_threshold", "bg_power", "confidence", "scales", "flip", "compat",
            "precision", "save_arrays", "max_pixels", "max_pixels_policy")
    s = {k: getattr(args, k) for k in keys}
    if args.template is not None:  # recorded only when given, so runs started before the option still resume
        s["template"] = args.template
    s["weights"] = model.fingerprint
    return s


#: what the worker processes import once (in the process that forks them), before the first image
_WORKER_PRELOAD = ("numpy", "PIL.Image", "torch", "tag2mask.methods.clip_es.label_stages", "tag2mask.methods.clip_es.label_maps")


def run(args: argparse.Namespace) -> int:
    from tag2mask.cmdline.options import overlap_settings
    from tag2mask.jobs.distributed import device_for_rank
    from tag2mask.jobs.overlap import start_worker_server
    from tag2mask.runtime import resolve_device

    check_options(args)
    if args.method != "clip-es":  # a method that brings its own label hook (registry)
        return _label_hook(args.method).run_label(args)
    args.device = device_for_rank(args.device)
    if overlap_settings(args, resolve_device(args.device))[0] > 0:
        start_worker_server(_WORKER_PRELOAD)  # the workers' imports overlap the model loading below
    import torch

    from tag2mask.cmdline.options import load_model_from_args, toy_model_warning
    from tag2mask.methods.clip_es.pipeline import ClipES
    from tag2mask.version import __version__
    from tag2mask.vocab.vocabulary import load_vocabulary

    out = Path(args.out)
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    vocab = load_vocabulary(args.classes)
    config = _clip_es_config(args)
    items = open_items(args, list(vocab.names))
    # rounded at load when the preset's numerics round weights, so ClipES needs no rounded copies
    model = load_model_from_args(args, official_rounding=config.numerics.round_weights_fp16)
    warning = toy_model_warning(model, [args.images])
    cam_maker = ClipES(model, vocab, config)
    settings = _settings(args, model)
    if args.refine == "crf":
        from tag2mask.refinement.crf import _import_densecrf

        _import_densecrf()  # fail at start-up, not in a worker on the first image, when the extra is missing
    stages = _label_stages(args, items, vocab, model, cam_maker)

    record = {
        "tag2mask": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "label",
        "settings": settings,
        "clip_es": config.to_dict(),
        "miou_rule": config.miou_rule,
        "classes": list(vocab.names),
        "weights": getattr(model, "source_path", None),
        "device": str(model_device(model)),
        "workers": stages.workers,
        "batch_size": stages.batch_size,
        "warnings": [warning] if warning else [],
    }
    return _run_label_job(args, items, stages, out, settings, record, vocab)


def _clip_es_config(args: argparse.Namespace) -> Any:
    """The CLIP-ES config of ``args``: a preset name in ``--classes`` selects the whole official setting
    (vocabulary, threshold, numerics); class files use voc's; the options override it."""
    from tag2mask.clip.numerics import NUMERICS
    from tag2mask.methods.clip_es.pipeline import PRESETS, preset_for

    preset = args.classes.strip().lower() if args.classes.strip().lower() in PRESETS else "voc"
    overrides = dict(scales=tuple(args.scales), flip=args.flip, precision=args.precision)
    if args.box_threshold is not None:
        overrides["box_threshold"] = args.box_threshold
    if not args.compat:
        overrides["numerics"] = NUMERICS["float32"]
    if args.template is not None:
        from tag2mask.vocab.templates import get_templates

        overrides["templates"] = get_templates([args.template])
    return preset_for(preset, **overrides)


def _label_stages(args: argparse.Namespace, items: Any, vocab: Any, model: Any, cam_maker: Any) -> Any:
    """The three stages of ``label`` (prepare an image, CAMs on the model's device, finish the mask)."""
    from tag2mask.cmdline.options import overlap_settings
    from tag2mask.methods.clip_es.label_stages import ComputeCAMs, FinishMask, LabelSettings, PrepareImage
    from tag2mask.jobs.overlap import Stages
    from tag2mask.methods.clip_es.label_maps import LabelRefiner

    # COCO "file_name" and the manifest's "image" field are relative to the image folder
    image_root = Path(items.image_dir) if hasattr(items, "image_dir") else Path(items.root) / "JPEGImages"
    workers, batch_size = overlap_settings(args, model_device(model))
    settings_for_workers = LabelSettings(
        class_names=tuple(vocab.names), image_root=str(image_root), out=str(Path(args.out)),
        max_decode_pixels=args.max_decode_pixels, max_pixels=args.max_pixels,
        max_pixels_policy=args.max_pixels_policy, save_arrays=args.save_arrays, refine=args.refine,
        bg_power=args.bg_power, confidence=args.confidence, compat=args.compat)
    # PAMR runs on the model's device when that is a GPU (as it always did); CRF and argmax are CPU work
    on_device = LabelRefiner(args.refine, bg_power=args.bg_power, device=model_device(model)) \
        if args.refine == "pamr" and model_device(model).type != "cpu" else None
    return Stages(PrepareImage(settings_for_workers), ComputeCAMs(cam_maker, args.save_arrays, on_device),
                  FinishMask(settings_for_workers), workers=workers, batch_size=batch_size,
                  preload=_WORKER_PRELOAD)


def _run_label_job(args: argparse.Namespace, items: Any, stages: Any, out: Path, settings: dict, record: dict,
                   vocab: Any) -> int:
    """Run the items through ``stages`` into ``out`` (resumable), print the summary; the exit code."""
    from tag2mask.jobs.runner import JobOptions, print_summary, process_exit_code, run_items

    def finalize(run_dir: Path, summary) -> None:
        if args.coco_json:
            from tag2mask.jobs.coco_export import write_coco_from_manifest

            record["coco_json"] = write_coco_from_manifest(run_dir, vocab.names, run_dir / "annotations.json")

    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="label", unit="img")
    summary = run_items(items, stages, out, settings, options, keys=item_keys(items),
                        preflight_errors=getattr(items, "errors", []), describe=lambda i: describe(items, i),
                        run_record=record, finalize=finalize, source_of=lambda i: source(items, i))
    if not args.quiet or summary.failed:
        print_summary(summary, out, "label")
    return process_exit_code(summary)


def model_device(model):
    return next(model.parameters()).device
