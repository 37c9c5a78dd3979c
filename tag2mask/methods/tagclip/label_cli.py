"""``tag2mask label --method tagclip``: pseudo-masks with no annotation - TagCLIP's tags, then CLIP-ES.

Registered in :mod:`tag2mask.methods.registry` as ``Command("label", "tagclip", ...)``: the official
annotation-free pipeline (spec 1, 6). The images are a folder with no ``--labels``: TagCLIP tags them
into ``OUT/tagclip/`` (:func:`.segment.predict_tags`), then CLIP-ES's ``label`` job
(:mod:`tag2mask.methods.clip_es.label_job`) runs on those tags with the vendored copy's differences
(affinity of blocks 5-11, no CRF confidence mask unless ``--confidence`` is given). CLIP-ES's options
(``--refine``, ``--box-threshold``, ``--no-compat``, ...) apply as with ``--method clip-es``.
"""

from __future__ import annotations

import argparse

from tag2mask.cmdline.options import reject_options
from tag2mask.methods.clip_es.label_job import check_clip_es_options, run_clip_es_label
from tag2mask.methods.tagclip.segment import check_image_folder, predict_tags

__all__ = ["add_label_options", "check_label_options", "run_label", "RAY_ENGINE"]

#: ``label --method tagclip --engine ray`` runs: the tag job and the CLIP-ES job, each in Ray actors
RAY_ENGINE = True


def add_label_options(p: argparse.ArgumentParser) -> None:
    """TagCLIP adds no option to ``label``: it reads CLIP-ES's (``--classes`` picks its preset too)."""


def check_label_options(args: argparse.Namespace) -> None:
    """With ``--method tagclip``: an image folder, no ``--labels`` / ``--split``, CLIP-ES's own checks."""
    if args.method != "tagclip":
        return
    reject_options(args, ("split",), "with --method tagclip (it takes a folder of images)")
    check_image_folder(args)
    check_clip_es_options(args)


def run_label(args: argparse.Namespace) -> int:
    """Tag the folder, then label it with CLIP-ES; the exit code (1 when either job failed on an image)."""
    from tag2mask.jobs.distributed import device_for_rank

    args.device = device_for_rank(args.device)
    tags = predict_tags(args)
    code = run_clip_es_label(args, tags.affinity_fn, tags.settings, tags.record)
    return max(code, tags.exit_code)
