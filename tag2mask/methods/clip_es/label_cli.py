"""``tag2mask label`` with CLIP-ES (the default ``--method``): CAMs -> refined pseudo-masks, per image.

Registered in :mod:`tag2mask.methods.registry` as ``Command("label", "clip-es", ...)``: ``label`` adds
:func:`add_label_options`, calls :func:`check_label_options` and runs :func:`run_label`. The checks and
the job live in :mod:`.label_job` (shared with the methods built on CLIP-ES's labelling, e.g. TagCLIP).
"""

from __future__ import annotations

import argparse

from tag2mask.cmdline import option_types as ot
from tag2mask.methods.clip_es.label_job import check_clip_es_options, run_clip_es_label

__all__ = ["REFINERS", "CLIP_ES_ONLY", "add_label_options", "check_label_options", "run_label", "RAY_ENGINE"]

#: ``label --method clip-es --engine ray`` runs (:func:`tag2mask.methods.clip_es.label_job.build_ray_worker`)
RAY_ENGINE = True

REFINERS = ("crf", "pamr", "none")
#: options only CLIP-ES reads (the other label methods reject them)
CLIP_ES_ONLY = ("refine", "box_threshold", "bg_power", "confidence", "template", "scales", "flip", "compat")


def add_label_options(p: argparse.ArgumentParser) -> None:
    """CLIP-ES's options of ``label``."""
    g = p.add_argument_group("CLIP-ES (--method clip-es, the default)")
    g.add_argument("--refine", default="pamr", choices=REFINERS,
                   help="post-processing: crf (dense CRF, extra 'crf'), pamr or none (default: pamr)")
    g.add_argument("--box-threshold", type=ot.finite_float(0, 1), default=None,
                   help="CAM box threshold lambda (default: the preset's, 0.4 for voc, 0.7 for coco)")
    g.add_argument("--bg-power", type=ot.finite_float(0, 100, lo_open=True), default=1.0,
                   help="with --refine pamr or none: background score (1 - max CAM)^p (default: 1)")
    g.add_argument("--confidence", type=ot.finite_float(0, 1, note="0 disables"), default=0.95, help="with --refine crf: pixels with max probability below this become 255 (default 0.95; 0 disables)")
    g.add_argument("--template", default=None, help="prompt template with one {} (default: the preset's, 'a clean origami {}.' "
                   "for voc/coco); tag2mask prompts select ranks candidates on your images")
    g.add_argument("--scales", type=ot.finite_float(0, 8, lo_open=True), nargs="+", default=[1.0], help="test-time scales averaged (default: 1.0, as the official code)")
    g.add_argument("--flip", action="store_true", help="also average horizontally flipped views")
    g.add_argument("--no-compat", dest="compat", action="store_false", help="plain float32 numerics (no fp16 rounding of "
                   "weights and positional embeddings) and no CRF image quirk; default: the official ones")


def check_label_options(args: argparse.Namespace) -> None:
    """CLIP-ES's checks (the other methods' hooks reject CLIP-ES's options when they run)."""
    if args.method == "clip-es":
        check_clip_es_options(args)


def run_label(args: argparse.Namespace) -> int:
    """``tag2mask label`` with CLIP-ES (options already checked by :func:`check_label_options`)."""
    return run_clip_es_label(args)
