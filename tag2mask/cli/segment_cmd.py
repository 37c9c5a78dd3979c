"""``tag2mask segment``: open-vocabulary segmentation of images with a frozen CLIP (no labels at all)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from tag2mask.cli.common import add_device_option, add_weights_options

METHOD_CHOICES = ("maskclip", "sclip", "clearclip", "naclip")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment",
        help="segment images into free-form class names (MaskCLIP, SCLIP, ClearCLIP, NACLIP; training-free)",
        description=(
            "Write a palette PNG label map per image (0 = background when background words or a probability "
            "threshold are given, then the classes in order), optionally an overlay with a legend and the "
            "per-class logits, plus OUT/run.json."
        ),
        epilog=(
            "examples:\n"
            "  tag2mask segment photo.jpg --classes \"cat, dog; background: sky, grass, wall\" --out seg --overlay\n"
            "  tag2mask segment photos/ --classes names.txt --method naclip --pamr --weights ViT-B-16.pt --out seg\n"
            "name-set file: one class per line, comma-separated synonyms (class score = max over synonyms),\n"
            "and 'background: sky, wall, ...' lines for background words. See docs/open_vocabulary.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IMAGE_OR_FOLDER", help="an image file or a folder of images (not recursive)")
    p.add_argument("--classes", required=True, help="inline 'cat, dog|puppy; background: sky, grass' or a name-set file")
    p.add_argument("--method", default="naclip", choices=METHOD_CHOICES, help="last-block variant (default: naclip)")
    p.add_argument("--out", required=True, help="output folder (masks/, overlays/, logits/, run.json)")
    p.add_argument("--mode", default="slide", choices=("whole", "slide"), help="whole image or sliding window (default: slide)")
    p.add_argument("--short-side", type=int, default=448, help="resize so the short side is this (default 448; 0 keeps the size)")
    p.add_argument("--crop", type=int, default=224, help="sliding-window crop (default 224)")
    p.add_argument("--stride", type=int, default=112, help="sliding-window stride (default 112)")
    p.add_argument("--prob-threshold", type=float, default=0.0,
                   help="pixels whose best class probability is below this become background (default 0; 0.1 is the SCLIP-family value)")
    p.add_argument("--area-threshold", type=float, default=None, help="suppress classes covering less than this fraction of the foreground")
    p.add_argument("--logit-scale", type=float, default=None, help="softmax temperature (default: the method's published value)")
    p.add_argument("--templates", default=None, help="prompt templates: imagenet80, maskclip85, photo, or one template with '{}'")
    p.add_argument("--compat", action="store_true", help="the method's official numerics (MaskCLIP: eps 1e-6, erf GELU, ImageNet mean/std, ...)")
    p.add_argument("--pamr", action="store_true", help="refine with PAMR (10 steps, dilations 8 and 16, as NACLIP)")
    p.add_argument("--overlay", action="store_true", help="also write OUT/overlays/<stem>.png with a legend")
    p.add_argument("--save-logits", action="store_true", help="also write OUT/logits/<stem>.npz (per-class logits, float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_weights_options(p)
    add_device_option(p)
    p.set_defaults(func=run)
    return p


def list_images(path: Path) -> list[Path]:
    """The image files to process: ``path`` itself, or the image-suffixed files of a folder, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image or folder")
    return [path]


def _output_stems(files: list[Path]) -> dict[Path, str]:
    """File stems, disambiguated when two inputs share one (``a.jpg`` and ``a.png`` -> ``a_jpg``, ``a_png``)."""
    counts: dict[str, int] = {}
    for f in files:
        counts[f.stem] = counts.get(f.stem, 0) + 1
    return {f: (f.stem if counts[f.stem] == 1 else f.name.replace(".", "_")) for f in files}


def _progress(items: Iterable, total: int, quiet: bool) -> Iterator:
    """tqdm over ``items`` on stderr, or a plain iterator when tqdm is missing or ``quiet``."""
    if quiet:
        return iter(items)
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a declared dependency; a bare environment still works, silently
        return iter(items)
    return iter(tqdm(items, total=total, desc="segment", unit="img", file=sys.stderr))


def _settings(args: argparse.Namespace) -> dict:
    keys = ("method", "classes", "mode", "short_side", "crop", "stride", "prob_threshold", "area_threshold",
            "logit_scale", "templates", "compat", "pamr")
    return {k: getattr(args, k) for k in keys}


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import tag2mask
    from tag2mask.cli.common import load_model_from_args
    from tag2mask.data.images import load_image
    from tag2mask.io.atomic import atomic_write_text
    from tag2mask.methods.ovss.segmenter import METHODS, OpenVocabSegmenter
    from tag2mask.vocab.vocabulary import load_vocabulary

    # cheap checks first, so a typo fails before the model is loaded
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose one of {list(METHOD_CHOICES)}")
    if not str(args.classes).strip():
        raise ValueError("--classes is empty; give e.g. 'cat, dog; background: sky' or a name-set file")
    vocab = load_vocabulary(args.classes)
    files = list_images(Path(args.input))
    out = Path(args.out)

    model = load_model_from_args(args)
    segmenter = OpenVocabSegmenter(
        model, vocab, args.method, templates=args.templates, compat=args.compat, mode=args.mode,
        short_side=args.short_side or None, crop=args.crop, stride=args.stride, logit_scale=args.logit_scale,
        prob_threshold=args.prob_threshold, area_threshold=args.area_threshold, pamr=args.pamr,
    )
    stems = _output_stems(files)
    results, failed = [], []
    started = time.time()
    for path in _progress(files, len(files), args.quiet):
        t0 = time.time()
        try:
            image = load_image(path)
            res = segmenter.predict(image)
            outputs = _write_outputs(out, stems[path], np.asarray(image, dtype=np.uint8), res, args)
        except Exception as e:  # one bad image never stops the job; it is reported and counted
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            msg = f"{type(e).__name__}: {e}"
            print(f"segment: skipped {path}: {msg}", file=sys.stderr)
            failed.append((str(path), msg))
            results.append({"input": str(path), "status": "error", "error": msg})
            continue
        present = [res.class_names[v] for v in res.present()]
        results.append({"input": str(path), "status": "ok", "outputs": outputs, "present": present,
                        "seconds": round(time.time() - t0, 3)})
    elapsed = time.time() - started
    record = {
        "tag2mask": tag2mask.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "segment",
        "settings": _settings(args),
        "segmenter": repr(segmenter),
        "logit_scale": segmenter.logit_scale,
        "templates": segmenter.templates if isinstance(segmenter.templates, str) else list(segmenter.templates),
        "class_names": list(segmenter.class_names),
        "label_values": {name: i for i, name in enumerate(segmenter.class_names)},
        "weights": getattr(model, "source_path", None),
        "weights_fingerprint": getattr(model, "fingerprint", None),
        "device": str(segmenter.device),
        "images": results,
        "written": len(files) - len(failed),
        "failed": len(failed),
        "seconds": round(elapsed, 2),
    }
    atomic_write_text(out / "run.json", json.dumps(record, indent=2, default=str))
    print(f"segment: {len(files) - len(failed)} written, {len(failed)} failed -> {out}", file=sys.stderr)
    return 1 if failed else 0


def _write_outputs(out: Path, stem: str, rgb, res, args: argparse.Namespace) -> dict[str, str]:
    """Mask PNG (+ overlay PNG, + logits npz) for one result; returns the written paths by kind."""
    import numpy as np

    from tag2mask.io.atomic import atomic_path
    from tag2mask.io.palette import save_label_png

    written = {"mask": str(out / "masks" / f"{stem}.png")}
    save_label_png(written["mask"], res.label)
    if args.overlay:
        from tag2mask.io.visualize import save_overlay

        # the overlay helper leaves label 0 as the photo and names label k by names[k - 1]; shift
        # background-free maps by one so their first class is drawn too
        if res.has_background:
            label, names = res.label, list(res.class_names[1:])
        else:
            label, names = res.label.astype(np.uint16) + 1, list(res.class_names)
        written["overlay"] = str(out / "overlays" / f"{stem}.png")
        save_overlay(written["overlay"], rgb, label.astype(np.uint8), names)
    if args.save_logits:
        written["logits"] = str(out / "logits" / f"{stem}.npz")
        with atomic_path(written["logits"]) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, logits=res.logits, class_names=np.array(res.class_names))
    return written
