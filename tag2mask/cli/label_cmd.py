"""``tag2mask label``: pseudo-masks for images with image-level labels (CLIP-ES)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from tag2mask.cli.common import (
    add_device_option,
    add_precision_option,
    add_run_options,
    add_weights_options,
)

REFINERS = ("crf", "pamr", "none")


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "label",
        help="pseudo-masks from image-level labels with CLIP-ES (training-free)",
        description=(
            "Write a pseudo-mask (palette PNG: 0 background, class id + 1, 255 ignore), the refined CAMs "
            "(npz) and a run record for every image. Labels come from a JSON/CSV file or, for a VOC root, "
            "from Annotations/*.xml."
        ),
        epilog=(
            "examples:\n"
            "  tag2mask label photos/ --labels tags.json --classes classes.txt --out run1\n"
            "  tag2mask label VOCdevkit/VOC2012 --split train --classes voc --weights ViT-B-16.pt --refine crf --out seeds\n"
            "LABELS formats: JSON {\"img.jpg\": [\"cat\", \"dog\"]} or CSV with header 'image,labels' and ';'-separated names."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", help="a folder of images, or a VOC root (JPEGImages + Annotations)")
    p.add_argument("--labels", default=None, help="JSON or CSV label file (omit for a VOC root)")
    p.add_argument("--split", default="train", help="VOC split file name when IMAGES is a VOC root (default: train)")
    p.add_argument(
        "--classes",
        default="voc",
        help="vocabulary: voc, coco, a name-set file (one class per line, comma-separated synonyms), "
        "or an inline list 'cat, dog; background: sky, grass' (default: voc)",
    )
    p.add_argument("--method", default="clip-es", choices=("clip-es",), help="localisation method (default: clip-es)")
    p.add_argument("--out", required=True, help="output folder (masks/, cams/, arrays/, run.json, manifest.jsonl)")
    p.add_argument("--refine", default="pamr", choices=REFINERS, help="post-processing: dense CRF (extra 'crf'), PAMR (default), none")
    p.add_argument("--box-threshold", type=float, default=None, help="CAM box threshold lambda (default: 0.4; 0.7 for coco)")
    p.add_argument("--bg-power", type=float, default=1.0, help="background score (1 - max CAM)^p (default 1)")
    p.add_argument("--confidence", type=float, default=0.95, help="with --refine crf: pixels with max probability below this become 255 (default 0.95; 0 disables)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time scales averaged (default: 1.0, as the official code)")
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped views")
    p.add_argument("--no-compat", dest="compat", action="store_false", help="do not reproduce the official fp16 weight rounding and CRF image quirk")
    p.add_argument("--save-arrays", action="store_true", help="also save every intermediate array (arrays/<stem>.npz), as in the golden fixtures")
    add_weights_options(p)
    add_device_option(p)
    add_precision_option(p)
    add_run_options(p)
    p.set_defaults(func=run)
    return p


def _open_items(args: argparse.Namespace, class_names: list[str]):
    from tag2mask.data.datasets import FolderDataset, VOCDataset, detect_dataset

    kind = detect_dataset(args.images)
    if args.labels is None:
        if kind != "voc":
            raise ValueError(f"{args.images}: not a VOC root, so --labels is required (JSON or CSV)")
        return VOCDataset(args.images, split=args.split, class_names=class_names)
    image_dir = Path(args.images)
    if kind == "voc":
        image_dir = image_dir / "JPEGImages" if (image_dir / "JPEGImages").is_dir() else image_dir / "VOC2012" / "JPEGImages"
    return FolderDataset(image_dir, args.labels, class_names, strict=False)


def _settings(args: argparse.Namespace, model) -> dict:
    keys = ("method", "classes", "refine", "box_threshold", "bg_power", "confidence", "scales", "flip", "compat", "precision", "save_arrays")
    s = {k: getattr(args, k) for k in keys}
    s["weights"] = model.fingerprint
    return s


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    import tag2mask
    from tag2mask.cli.common import load_model_from_args
    from tag2mask.data.images import load_image
    from tag2mask.io.atomic import atomic_path
    from tag2mask.io.manifest import RunManifest, check_settings
    from tag2mask.methods.clip_es import ClipES, preset_for
    from tag2mask.methods.pseudo_labels import LabelRefiner
    from tag2mask.vocab.vocabulary import load_vocabulary

    out = Path(args.out)
    vocab = load_vocabulary(args.classes)
    preset = "coco" if args.classes == "coco" else "voc"
    overrides = dict(scales=tuple(args.scales), flip=args.flip, precision=args.precision)
    if args.box_threshold is not None:
        overrides["box_threshold"] = args.box_threshold
    config = preset_for(preset, **overrides)
    items = _open_items(args, list(vocab.names))
    model = load_model_from_args(args, official_rounding=args.compat)
    check_settings(out, _settings(args, model), args.overwrite)
    cam_maker = ClipES(model, vocab, config)
    refiner = LabelRefiner(args.refine, bg_power=args.bg_power, confidence=args.confidence, compat=args.compat, device=model_device(model))

    dirs = {name: out / name for name in ("masks", "cams") + (("arrays",) if args.save_arrays else ())}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    manifest = RunManifest(out)
    done = manifest.completed() if args.resume else {}
    failed, written, skipped = [], 0, 0
    for entry, message in getattr(items, "errors", []):
        manifest.record(entry, "error", error=message)
        failed.append((entry, message))
    n_items = len(items) if args.limit is None else min(args.limit, len(items))
    started = time.time()
    bar = tqdm(range(n_items), desc="label", unit="img", disable=args.quiet, file=sys.stderr)
    for i in bar:
        try:
            sample = items[i]
        except (ValueError, FileNotFoundError) as e:  # a bad annotation file: report, keep going
            manifest.record(f"#{i}", "error", error=str(e))
            failed.append((f"#{i}", str(e)))
            continue
        if sample.name in done:
            skipped += 1
            continue
        try:
            image = load_image(sample.image_path)
            if not sample.label_ids:
                raise ValueError(f"{sample.image_path}: no image-level labels")
            result = cam_maker(image, sample.label_ids, keep_arrays=args.save_arrays)
            rgb = np.asarray(image, dtype=np.uint8)
            label, extra = refiner(result.cams, result.keys, rgb)
            outputs = _write_outputs(dirs, sample.name, label, result, extra, atomic_path)
        except Exception as e:  # one bad item never stops the job; it is reported in the manifest
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            manifest.record(sample.name, "error", error=f"{type(e).__name__}: {e}")
            failed.append((sample.name, str(e)))
            continue
        manifest.record(sample.name, "ok", outputs=outputs, labels=[vocab.names[k] for k in result.keys])
        written += 1
    manifest.close()
    elapsed = time.time() - started
    record = {
        "tag2mask": tag2mask.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": _settings(args, model),
        "clip_es": config.__dict__,
        "classes": list(vocab.names),
        "weights": getattr(model, "source_path", None),
        "device": str(model_device(model)),
        "items": n_items,
        "written": written,
        "skipped_already_done": skipped,
        "failed": len(failed),
        "seconds": round(elapsed, 2),
        "images_per_second": round(written / elapsed, 3) if elapsed > 0 else None,
    }
    from tag2mask.io.atomic import atomic_write_text

    atomic_write_text(out / "run.json", json.dumps(record, indent=2, default=str))
    print(f"label: {written} written, {skipped} already done, {len(failed)} failed -> {out}", file=sys.stderr)
    for name, msg in failed[:20]:
        print(f"  failed {name}: {msg}", file=sys.stderr)
    return 1 if failed else 0


def model_device(model):
    return next(model.parameters()).device


def _write_outputs(dirs, stem, label, result, extra, atomic_path) -> list[str]:
    import numpy as np

    from tag2mask.io.palette import save_label_png

    mask_path = dirs["masks"] / f"{stem}.png"
    cam_path = dirs["cams"] / f"{stem}.npz"
    for p in (mask_path, cam_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    save_label_png(mask_path, label)
    with atomic_path(cam_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keys=result.keys, cams=result.cams)
    outputs = [str(mask_path), str(cam_path)]
    if "arrays" in dirs:
        arr_path = dirs["arrays"] / f"{stem}.npz"
        arr_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(arr_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **result.arrays, **extra)
        outputs.append(str(arr_path))
    return outputs
