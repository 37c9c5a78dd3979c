"""``tag2mask prompts select``: rank prompt templates on your images and tags (CLIP-ES Eq. 9)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tag2mask.cmdline.options import add_device_option, add_weights_options
from tag2mask.cmdline import option_types as ot

#: built-in candidates: the two CLIP-ES templates named in the paper/code, then OpenAI's 80 ImageNet ones
BUILTIN = "builtin"


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prompts",
        help="choose a prompt template for CLIP-ES on your own images (sharpness-based selection)",
        description=(
            "prompts select: classify every image with CLIP under each candidate template and rank the\n"
            "templates by CLIP-ES's sharpness (paper Eq. 9): over the images with two or more labels, the\n"
            "mean variance-to-mean ratio of the softmax scores of each image's own classes. Lower is better:\n"
            "the template spreads the probability over all the classes an image contains. Use the winner\n"
            "with tag2mask label --template (the presets keep the official 'a clean origami {}.')."
        ),
        epilog=(
            "examples:\n"
            "  tag2mask prompts select --images photos/ --labels tags.json --classes classes.txt --weights ViT-B-16.pt\n"
            "  tag2mask prompts select --images VOCdevkit/VOC2012 --split train --classes voc --templates mine.txt\n"
            "TEMPLATES: 'builtin' (the CLIP-ES candidates + OpenAI's 80 ImageNet templates), a set name "
            "(imagenet80, maskclip85, clip-es, photo) or a text file with one template per line, each with one {}."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("select",), help="select: rank the candidate templates")
    p.add_argument("--images", required=True, help="a folder of images, a VOC root or a COCO root (as for tag2mask label)")
    p.add_argument("--labels", default=None, help="JSON or CSV label file (omit for a VOC or COCO root)")
    p.add_argument("--split", default="train", help="split of a VOC/COCO root (default: train)")
    p.add_argument("--classes", default="voc", help="voc, coco, synth, a name-set file or an inline list (default: voc)")
    p.add_argument("--templates", default=BUILTIN, help="candidate templates: builtin, a set name or a file (default: builtin)")
    p.add_argument("--limit", type=ot.positive_int(ot.MAX_COUNT), default=None, help="use at most this many images (default: all)")
    p.add_argument("--top", type=ot.positive_int(1_000_000), default=10, help="rows printed (default 10; the JSON has all)")
    p.add_argument("--out", default=None, help="write the full ranking as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_weights_options(p)
    add_device_option(p)
    p.set_defaults(func=run)
    return p


def resolve_templates(spec: str) -> tuple[str, ...]:
    """``builtin``, a template-set name or a file of templates (one per line, ``#`` comments)."""
    from tag2mask.vocab.templates import CLIP_ES, IMAGENET_80, get_templates

    if spec == BUILTIN:
        return tuple(dict.fromkeys(CLIP_ES + ("a rendering of a weird {}.",) + IMAGENET_80))
    path = Path(spec)
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        templates = [ln for ln in lines if ln and not ln.startswith("#")]
        try:
            return tuple(dict.fromkeys(get_templates(templates)))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return get_templates(spec)


def run(args: argparse.Namespace) -> int:
    from tag2mask.cmdline.options import load_model_from_args
    from tag2mask.cmdline.items import open_items
    from tag2mask.data.images import load_image
    from tag2mask.io.atomic import atomic_write_text
    from tag2mask.methods.clip_es.prompt_selection import rank_templates
    from tag2mask.vocab.vocabulary import load_vocabulary

    vocab = load_vocabulary(args.classes)
    templates = resolve_templates(args.templates)
    items = open_items(args, list(vocab.names))
    samples = [items[i] for i in range(len(items) if args.limit is None else min(args.limit, len(items)))]
    samples = [s for s in samples if s.label_ids]
    if not any(len(s.label_ids) >= 2 for s in samples):
        raise ValueError(f"{args.images}: no image has two or more labels; sharpness needs multi-label images")
    images = [load_image(s.image_path) for s in samples]
    model = load_model_from_args(args)
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        progress = lambda it: tqdm(it, desc="templates", unit="tpl")  # noqa: E731
    ranking = rank_templates(model, images, [s.label_ids for s in samples], vocab, templates, progress=progress)
    print("| rank | sharpness (lower is better) | mean own-class prob | template |")
    print("|---|---|---|---|")
    for r, score in enumerate(ranking[: args.top], start=1):
        print(f"| {r} | {score.sharpness:.4f} | {score.mean_label_prob:.4f} | {score.template} |")
    multi = ranking[0].images if ranking else 0
    print(f"{len(templates)} templates on {len(images)} images ({multi} with two or more labels); best: {ranking[0].template!r}")
    if args.out:
        record = {
            "images": len(images), "multi_label_images": multi, "classes": list(vocab.names),
            "weights": getattr(model, "source_path", None),
            "ranking": [{"template": s.template, "sharpness": None if math.isnan(s.sharpness) else s.sharpness,
                         "mean_label_prob": s.mean_label_prob} for s in ranking],
        }
        atomic_write_text(Path(args.out), json.dumps(record, indent=1))
        print(f"wrote {args.out}")
    return 0
