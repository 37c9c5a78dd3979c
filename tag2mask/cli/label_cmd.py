"""``tag2mask label``: pseudo-masks for images with image-level labels (CLIP-ES)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from tag2mask.cli.common import (
    add_device_option,
    add_overlap_options,
    add_precision_option,
    add_run_options,
    add_weights_options,
    check_overlap_options,
    check_weights_options,
    given,
    record_given_options,
    reject_options,
)
from tag2mask.cli.label_fma import ItemsAPI, add_fma_options, check_fma_options, run_fma_label
from tag2mask.methods.tagclip.segment import add_label_options, prepare_auto_tags  # TagCLIP hook (issue 29)

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
            "file's '<image id> <class id> ...' lines, as the official scripts read them. For an image folder without "
            "--labels (or with --tags auto) TagCLIP predicts the tags first (docs/tagclip.md)."
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
    p.add_argument("--method", default="clip-es", choices=("clip-es", "fma"),
                   help="clip-es (training-free, default) or fma (FMA-WSSS: learned prompts of --prompts RUN + seeding)")
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
    add_fma_options(p)
    add_label_options(p)  # TagCLIP hook (issue 29): --tags auto
    p.set_defaults(func=run)
    record_given_options(p)
    return p


def check_options(args: argparse.Namespace) -> None:
    """Options that do not apply to the chosen refinement / input are errors, not silently ignored."""
    if args.method == "fma":
        reject_options(args, ("tags",), "with --method fma (TagCLIP's tags feed CLIP-ES)")  # TagCLIP hook
    check_fma_options(args)
    check_overlap_options(args)
    if args.method == "fma":
        return
    check_weights_options(args)
    if args.refine != "crf":
        reject_options(args, ("confidence",), f"with --refine {args.refine} (it masks low-confidence CRF pixels)")
    else:
        reject_options(args, ("bg_power",), "with --refine crf (the CRF computes its own background)")
    if args.labels is not None:
        reject_options(args, ("split",), "with --labels (the label file lists the images)")


#: VOC roots: how many annotations are read up front to tell a wrong --classes from a few bad files
_XML_SAMPLE = 64


def _open_items(args: argparse.Namespace, class_names: list[str]):
    from tag2mask.data.datasets import COCODataset, FolderDataset, VOCDataset, detect_dataset, xml_object_names
    from tag2mask.data.labels import read_labels_file

    kind = detect_dataset(args.images)
    if args.labels is None:
        if kind == "coco":
            split = args.split if args.split.endswith(".txt") else f"{args.split}.txt"
            return COCODataset(args.images, split, class_names)
        if kind != "voc":
            raise ValueError(f"{args.images}: not a VOC or COCO root, so --labels is required (JSON or CSV)")
        dataset = VOCDataset(args.images, split=args.split, class_names=class_names)
        tags = {}
        for name in dataset.names[:_XML_SAMPLE]:
            try:
                tags[name] = xml_object_names(dataset.root / "Annotations" / f"{name}.xml")
            except ValueError:
                continue  # a broken annotation is that item's error record
        sampled = f" (the first {len(tags)} of {len(dataset)})" if len(dataset) > _XML_SAMPLE else ""
        _check_vocabulary(args, tags, class_names, f"{dataset.root / 'Annotations'}{sampled}")
        return dataset
    image_dir = Path(args.images)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    if kind in ("voc", "coco"):
        image_dir = image_dir / "JPEGImages" if (image_dir / "JPEGImages").is_dir() else image_dir / "VOC2012" / "JPEGImages"
    _check_vocabulary(args, read_labels_file(args.labels), class_names, str(args.labels))
    return FolderDataset(image_dir, args.labels, class_names, strict=False)


def _check_vocabulary(args: argparse.Namespace, tags: dict, class_names: list[str], source: str) -> None:
    """One error up front when the tags are not names of --classes (typically: --classes forgotten).

    With the default --classes any unknown name stops the run; with an explicit --classes only a
    file where every image has an unknown name does (a few bad entries become per-image errors).
    """
    from tag2mask.data.labels import unknown_class_names
    from tag2mask.synth.export import is_synthetic_export

    unknown = unknown_class_names(tags, class_names)
    bad_images = {image for images in unknown.values() for image in images}
    if not unknown or (given(args, "classes") and len(bad_images) < len(tags)):
        return
    names = sorted(unknown, key=lambda n: (-len(unknown[n]), n))
    shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    if is_synthetic_export(args.images):
        hint = "pass --classes synth (this is a tag2mask synth export)"
    else:
        hint = ("pass --classes with your class list: a name-set file (one class per line), an inline list "
                "'cat, dog, ...', or voc / coco / synth")
    which = f"--classes {args.classes}" + ("" if given(args, "classes") else " (the default)")
    raise ValueError(f"{source}: {len(bad_images)} of {len(tags)} images are tagged with class names that {which} "
                     f"does not know: {shown}; {hint}")


def _item_keys(dataset) -> list[str]:
    """Item names without building samples (a VOC sample parses its XML; that may fail per item)."""
    return dataset.names


def _describe(dataset, i: int) -> str:
    """The image file of item ``i`` for messages (its name if the sample cannot be built)."""
    try:
        return str(dataset[i].image_path)
    except Exception:
        return str(dataset.names[i])


def _source(dataset, i: int) -> dict:
    """Item ``i``'s inputs as they are now: its image file's size and time, and its labels (for --resume)."""
    from tag2mask.io.manifest import file_state

    sample = dataset[i]
    return {"image": file_state(sample.image_path), "labels": list(sample.label_ids)}


def _settings(args: argparse.Namespace, model) -> dict:
    keys = ("method", "classes", "refine", "box_threshold", "bg_power", "confidence", "scales", "flip", "compat",
            "precision", "save_arrays", "max_pixels", "max_pixels_policy")
    s = {k: getattr(args, k) for k in keys}
    if args.template is not None:  # recorded only when given, so runs started before the option still resume
        s["template"] = args.template
    s["weights"] = model.fingerprint
    return s


#: what the worker processes import once (in the process that forks them), before the first image
_WORKER_PRELOAD = ("numpy", "PIL.Image", "torch", "tag2mask.cli.label_stages", "tag2mask.methods.pseudo_labels")


def run(args: argparse.Namespace) -> int:
    from tag2mask.cli.common import overlap_settings
    from tag2mask.jobs.distributed import device_for_rank
    from tag2mask.jobs.overlap import start_worker_server
    from tag2mask.runtime import resolve_device

    check_options(args)
    if args.method == "fma":
        return run_fma_label(args, ItemsAPI(_open_items, _item_keys, _describe, _source))
    args.device = device_for_rank(args.device)
    auto = prepare_auto_tags(args)  # TagCLIP hook (issue 29): no tags -> predicted into OUT/tagclip, sets --labels
    if overlap_settings(args, resolve_device(args.device))[0] > 0:
        start_worker_server(_WORKER_PRELOAD)  # the workers' imports overlap the model loading below
    import torch

    import tag2mask
    from tag2mask.cli.common import load_model_from_args, toy_model_warning
    from tag2mask.cli.label_stages import ComputeCAMs, FinishMask, LabelSettings, PrepareImage
    from tag2mask.jobs.overlap import Stages
    from tag2mask.jobs.runner import JobOptions, print_summary, process_exit_code, run_items
    from tag2mask.clip.numerics import NUMERICS
    from tag2mask.methods.clip_es import PRESETS, ClipES, preset_for
    from tag2mask.methods.pseudo_labels import LabelRefiner
    from tag2mask.vocab.vocabulary import load_vocabulary

    out = Path(args.out)
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    vocab = load_vocabulary(args.classes)
    # a preset name selects the whole official setting (vocabulary, threshold, numerics); files use voc's
    preset = args.classes.strip().lower() if args.classes.strip().lower() in PRESETS else "voc"
    overrides = dict(scales=tuple(args.scales), flip=args.flip, precision=args.precision)
    if args.box_threshold is not None:
        overrides["box_threshold"] = args.box_threshold
    if not args.compat:
        overrides["numerics"] = NUMERICS["float32"]
    if args.template is not None:
        from tag2mask.vocab.templates import get_templates

        overrides["templates"] = get_templates([args.template])
    config = preset_for(preset, **overrides)
    items = _open_items(args, list(vocab.names))
    # rounded at load when the preset's numerics round weights, so ClipES needs no rounded copies
    model = load_model_from_args(args, official_rounding=config.numerics.round_weights_fp16)
    warning = toy_model_warning(model, [args.images])
    cam_maker = ClipES(model, vocab, config, affinity_fn=auto.affinity_fn if auto else None)  # TagCLIP hook
    settings = _settings(args, model) | (auto.settings if auto else {})  # TagCLIP hook
    if args.refine == "crf":
        from tag2mask.refinement.crf import _import_densecrf

        _import_densecrf()  # fail at start-up, not in a worker on the first image, when the extra is missing
    # COCO "file_name" and the manifest's "image" field are relative to the image folder
    image_root = Path(items.image_dir) if hasattr(items, "image_dir") else Path(items.root) / "JPEGImages"
    workers, batch_size = overlap_settings(args, model_device(model))
    settings_for_workers = LabelSettings(
        class_names=tuple(vocab.names), image_root=str(image_root), out=str(out), max_decode_pixels=args.max_decode_pixels,
        max_pixels=args.max_pixels, max_pixels_policy=args.max_pixels_policy, save_arrays=args.save_arrays,
        refine=args.refine, bg_power=args.bg_power, confidence=args.confidence, compat=args.compat)
    # PAMR runs on the model's device when that is a GPU (as it always did); CRF and argmax are CPU work
    on_device = LabelRefiner(args.refine, bg_power=args.bg_power, device=model_device(model)) \
        if args.refine == "pamr" and model_device(model).type != "cpu" else None
    stages = Stages(PrepareImage(settings_for_workers), ComputeCAMs(cam_maker, args.save_arrays, on_device),
                    FinishMask(settings_for_workers), workers=workers, batch_size=batch_size,
                    preload=_WORKER_PRELOAD)

    record = {
        "tag2mask": tag2mask.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "label",
        "settings": settings,
        "clip_es": config.to_dict(),
        "miou_rule": config.miou_rule,
        "classes": list(vocab.names),
        "weights": getattr(model, "source_path", None),
        "device": str(model_device(model)),
        "workers": workers,
        "batch_size": batch_size,
        "warnings": [warning] if warning else [],
        **(auto.record if auto else {}),  # TagCLIP hook
    }

    def finalize(run_dir: Path, summary) -> None:
        if args.coco_json:
            from tag2mask.jobs.coco_export import write_coco_from_manifest

            record["coco_json"] = write_coco_from_manifest(run_dir, vocab.names, run_dir / "annotations.json")

    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="label", unit="img")
    summary = run_items(items, stages, out, settings, options, keys=_item_keys(items),
                        preflight_errors=getattr(items, "errors", []), describe=lambda i: _describe(items, i),
                        run_record=record, finalize=finalize, source_of=lambda i: _source(items, i))
    if not args.quiet or summary.failed:
        print_summary(summary, out, "label")
    return max(process_exit_code(summary), auto.exit_code if auto else 0)  # TagCLIP hook: tag failures count


def model_device(model):
    return next(model.parameters()).device
