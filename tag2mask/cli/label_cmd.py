"""``tag2mask label``: pseudo-masks for images with image-level labels (CLIP-ES by default).

The options every method shares live here; each ``--method`` (:mod:`tag2mask.methods.registry`,
``Command("label", NAME, MODULE)``) adds its own options, checks them and runs the job
(``add_label_options / check_label_options / run_label``).
"""

from __future__ import annotations

import argparse

from tag2mask.cmdline.options import (
    add_device_option,
    add_engine_options,
    add_overlap_options,
    add_precision_option,
    add_run_options,
    add_weights_options,
    check_engine_options,
    check_overlap_options,
    record_given_options,
)
from tag2mask.cmdline import option_types as ot
from tag2mask.methods import registry

#: default --max-pixels: 1 MP (about 1000x1000). CLIP-ES's attention affinity is quadratic in the
#: number of 16x16 patches (1 MP = 3,900 tokens -> 61 MB per attention map, 4 MP -> 1 GB), so larger
#: images would exhaust memory; VOC / COCO images (at most 640x640 = 0.41 MP) are never resized.
DEFAULT_MAX_PIXELS = 1_000_000
#: default --max-decode-pixels: the decoder's own decompression-bomb limit (tag2mask.data.images)
MAX_DECODE_PIXELS = 100_000_000


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
                   "(JPEGImages + SegmentationClass + split files); a folder may be a URI with --labels: "
                   "s3://bucket/prefix, gs://..., file:///... (read through pyarrow.fs; docs/batch_jobs.md)")
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
                   help=" or ".join(f"{c.name} ({c.help})" for _, c in hooks))
    p.add_argument("--out", required=True, help="output folder (masks/, cams/, arrays/, run.json, manifest.jsonl, logs/)")
    p.add_argument("--save-arrays", action="store_true", help="also save every intermediate array (arrays/<stem>.npz), as in the golden fixtures")
    p.add_argument(
        "--max-pixels", type=ot.positive_int(ot.MAX_PIXELS), default=DEFAULT_MAX_PIXELS,
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
        "--max-decode-pixels", type=ot.positive_int(ot.MAX_PIXELS), default=MAX_DECODE_PIXELS,
        help=f"images above this many pixels are refused before decoding (decompression-bomb guard; default {MAX_DECODE_PIXELS:,})",
    )
    p.add_argument("--coco-json", action="store_true", help="also write OUT/annotations.json (COCO RLE, merged over ranks) at the end")
    add_weights_options(p)
    add_device_option(p)
    add_precision_option(p)
    add_run_options(p)
    add_overlap_options(p, "decode images and refine / write masks")
    add_engine_options(p)
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
    """Options that do not apply to the chosen method / refinement / input are errors, not silently ignored."""
    check_engine_options(args)
    if args.engine == "ray" and not getattr(_label_hook(args.method), "RAY_ENGINE", False):
        ray_methods = [c.name for _, c in registry.commands("label") if getattr(_label_hook(c.name), "RAY_ENGINE", False)]
        raise ValueError(f"--engine ray does not run label --method {args.method}; it runs --method "
                         f"{', '.join(ray_methods)}")
    for _, command in registry.commands("label"):  # each method checks its own options and rejects the others'
        _label_hook(command.name).check_label_options(args)
    check_overlap_options(args)


def run(args: argparse.Namespace) -> int:
    check_options(args)
    return _label_hook(args.method).run_label(args)
