"""Classify then segment: TagCLIP's tags, then CLIP-ES (``label --method tagclip``), spec sections 1 and 6.

:func:`predict_tags` runs the TagCLIP job into ``OUT/tagclip/`` (resumable, its own manifest), points
``--labels`` at the ``tags.json`` it wrote and returns what CLIP-ES changes in the vendored copy of the
official repository (:mod:`.label_cli` then runs CLIP-ES's ``label`` job with it):

* the attention affinity averages blocks 5-11 (7 maps; CLIP-ES: 5-12) - :func:`affinity_blocks_5_to_11`;
* the dense CRF has no 0.95 confidence mask (``--confidence 0`` unless given);
* labels come from the tag file and the size from the decoded image (as ``label`` always does).

The tagger runs on its own unrounded copy of the weights; CLIP-ES then applies its official
numerics (fp16-rounded weights) to the model ``label`` loads, as the two official code bases do.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["TAG_DIR", "PredictedTags", "check_image_folder", "predict_tags", "affinity_blocks_5_to_11",
           "build_ray_tagger"]

#: where the tag job of ``label --method tagclip`` writes, inside ``--out``
TAG_DIR = "tagclip"


def affinity_blocks_5_to_11(maps):
    """``(n, L, L)`` maps ending with the last block's -> ``(hw, hw)`` mean of the 7 before it (CLS dropped).

    The vendored CLIP-ES of TagCLIP averages ``[-8:-1]`` of the 12 maps (spec 6.2).
    """
    from tag2mask.localization.affinity import mean_attention

    return mean_attention(maps[:-1], last=7)


@dataclass
class PredictedTags:
    """What :func:`predict_tags` hands to CLIP-ES's ``label`` job.

    affinity_fn: CLIP-ES's affinity replacement; settings: added to the run's settings (resume guard);
    record: added to ``run.json``; exit_code: 1 when the tag job failed on some images.
    """

    affinity_fn: Callable
    settings: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0


def check_image_folder(args: argparse.Namespace) -> None:
    """The tags are predicted for a folder of images: no ``--labels``, no VOC / COCO root."""
    from tag2mask.data.datasets import detect_dataset

    from tag2mask.io.uri_inputs import is_uri

    if args.labels is not None:
        raise ValueError("--method tagclip predicts the tags: do not pass --labels (use --method clip-es with them)")
    if is_uri(args.images):  # an object store's prefix: listed when the job starts
        return
    if detect_dataset(args.images) in ("voc", "coco"):
        raise ValueError(f"--method tagclip takes an image folder; for a VOC or COCO root pass "
                         f"{Path(args.images) / 'JPEGImages'}")
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"image folder not found: {args.images}")


def predict_tags(args: argparse.Namespace) -> PredictedTags:
    """Run the TagCLIP job into ``OUT/tagclip``; set ``args.labels`` (and ``args.confidence``)."""
    from tag2mask.cmdline.options import given
    from tag2mask.data.datasets import open_image_folder
    from tag2mask.jobs.runner import JobOptions, print_summary, run_items
    from tag2mask.methods.tagclip.job import finalize_tags, item_source, load_tagger, tag_item_fn
    from tag2mask.methods.tagclip.presets import config_for_classes

    preset, config = config_for_classes(args.classes, compat=args.compat)
    items = open_image_folder(args.images)
    if not len(items):
        raise FileNotFoundError(f"{args.images}: no image files in this folder")
    out = Path(args.out) / TAG_DIR
    engine = None
    if getattr(args, "engine", "local") == "ray":  # the tag job runs in Ray actors too, each with its tagger
        from tag2mask.cmdline.options import ray_engine_from_args

        engine = ray_engine_from_args(args, "tag2mask.methods.tagclip.segment:build_ray_tagger",
                                      lambda sample: sample.image_path, build_args=argparse.Namespace(**vars(args)))
    # with Ray the driver loads the tagger too, for its fingerprint (the settings guard)
    _, tagger = load_tagger(args, config)
    settings = {"command": "tag", "classes": args.classes, "preset": preset, "compat": args.compat, "cwr": True,
                "save_arrays": False, "weights": tagger.model.fingerprint}
    result: dict[str, Any] = {}
    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="tag", unit="img")
    record = {"command": "tag", "settings": settings,
              "tagclip": config.to_dict() | {"attn_mean_blocks_used": list(tagger.mean_layers)}}
    if engine is not None:
        record["engine"] = engine.stats
    summary = run_items(items, tag_item_fn(tagger, items, out, False), out, settings, options, keys=items.names,
                        run_record=record, finalize=lambda d, s: finalize_tags(d, items, config, preset, None, result),
                        source_of=lambda i: item_source(items, i), engine=engine)
    if summary.failed:
        print_summary(summary, out, "tag")
    del tagger  # the label stage loads the model with CLIP-ES's numerics
    args.labels = str(out / "tags.json")
    if args.refine == "crf" and not given(args, "confidence"):
        args.confidence = 0.0  # the vendored CLIP-ES's CRF has no confidence mask (spec 6.5)
    settings = {"tags": "TagCLIP", "affinity": "blocks 5-11 (TagCLIP's CLIP-ES)"}
    record = {"tags": {"source": "TagCLIP", "preset": preset, "tag_dir": TAG_DIR, "tagclip": config.to_dict(),
                       "confidence_mask": args.confidence if args.refine == "crf" else None}}
    return PredictedTags(affinity_blocks_5_to_11, settings, record, 1 if summary.failed else 0)


def build_ray_tagger(args: argparse.Namespace) -> tuple:
    """In a Ray actor: ``(items, process)`` of the tag job of :func:`predict_tags` (``args``: a copy of the
    command's checked arguments taken before the job), the tagger loaded here."""
    from tag2mask.data.datasets import open_image_folder
    from tag2mask.methods.tagclip.job import load_tagger, tag_item_fn
    from tag2mask.methods.tagclip.presets import config_for_classes

    _, config = config_for_classes(args.classes, compat=args.compat)
    items = open_image_folder(args.images)
    _, tagger = load_tagger(args, config)
    return items, tag_item_fn(tagger, items, Path(args.out) / TAG_DIR, False)
