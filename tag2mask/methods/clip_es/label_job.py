"""CLIP-ES's ``label`` job: its option checks and the run (model, stages, resumable job), for every
``label --method`` built on CLIP-ES (CLIP-ES itself, :mod:`tag2mask.methods.clip_es.label_cli`; TagCLIP's
annotation-free pipeline, :mod:`tag2mask.methods.tagclip.label_cli`, which passes its own attention
affinity, settings and run record).

The job runs as overlapped stages (:mod:`.label_stages`): decode, CAMs on the device
(:class:`~.pipeline.ClipES`), then refinement (:mod:`.label_maps`) and the writes in CPU workers.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any, Callable, Optional

from tag2mask.cmdline.items import open_items, run_item_job
from tag2mask.cmdline.options import check_weights_options, reject_options

__all__ = ["check_clip_es_options", "run_clip_es_label", "model_device"]


def check_clip_es_options(args: argparse.Namespace) -> None:
    """The checks of CLIP-ES's own options (weights, refinement, --labels vs --split)."""
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


def run_clip_es_label(args: argparse.Namespace, affinity_fn: Optional[Callable] = None,
                      extra_settings: Optional[dict] = None, extra_record: Optional[dict] = None) -> int:
    """Run CLIP-ES's ``label`` job on checked ``args``; the exit code.

    ``affinity_fn``: replaces the mean of the last attention maps (:class:`~.pipeline.ClipES`);
    ``extra_settings`` join the run's settings (the ``--resume`` guard), ``extra_record`` its ``run.json``.
    """
    from tag2mask.cmdline.options import overlap_settings
    from tag2mask.jobs.distributed import device_for_rank
    from tag2mask.jobs.overlap import start_worker_server
    from tag2mask.runtime import resolve_device

    ray = getattr(args, "engine", "local") == "ray"
    args.device = device_for_rank(args.device)
    if not ray and overlap_settings(args, resolve_device(args.device))[0] > 0:
        start_worker_server(_WORKER_PRELOAD)  # the workers' imports overlap the model loading below
    import torch

    from tag2mask.cmdline.options import toy_model_warning
    from tag2mask.version import __version__

    out = Path(args.out)
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    engine = None
    if ray:
        from tag2mask.cmdline.options import ray_engine_from_args

        # the affinity replacement travels by reference (a module-level function, e.g. TagCLIP's)
        engine = ray_engine_from_args(args, "tag2mask.methods.clip_es.label_job:build_ray_worker",
                                      lambda sample: sample.image_path, build_args=(args, affinity_fn))
    # with Ray the driver loads the model for its fingerprint (the settings guard); each actor builds its own
    vocab, config, items, model, cam_maker = _build(args, affinity_fn)
    warning = toy_model_warning(model, [args.images])
    settings = _settings(args, model) | (extra_settings or {})
    if args.refine == "crf":
        from tag2mask.refinement.crf import import_densecrf

        import_densecrf()  # fail at start-up, not in a worker on the first image, when the extra is missing
    stages = _label_stages(args, items, vocab, model, cam_maker, serial=ray)

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
        **(extra_record or {}),
    }
    if engine is not None:  # what ran: actors, threads per actor and Ray's start-up time (each actor: serial stages)
        record["engine"] = engine.stats
    return _run_label_job(args, items, stages, out, settings, record, vocab, engine)


def _build(args: argparse.Namespace, affinity_fn: Optional[Callable] = None) -> tuple:
    """``(vocab, config, items, model, cam_maker)`` of checked ``args`` (the driver's and each Ray actor's)."""
    from tag2mask.cmdline.options import load_model_from_args
    from tag2mask.methods.clip_es.pipeline import ClipES
    from tag2mask.vocab.vocabulary import load_vocabulary

    vocab = load_vocabulary(args.classes)
    config = _clip_es_config(args)
    items = open_items(args, list(vocab.names))
    # rounded at load when the preset's numerics round weights, so ClipES needs no rounded copies
    model = load_model_from_args(args, official_rounding=config.numerics.round_weights_fp16)
    return vocab, config, items, model, ClipES(model, vocab, config, affinity_fn=affinity_fn)


def build_ray_worker(build: tuple[argparse.Namespace, Optional[Callable]]) -> tuple[Any, Callable[[Any, Optional[bytes]], Any]]:
    """In a Ray actor: ``(items, process)`` built from the command's checked ``args`` and ``affinity_fn``
    (``build``; see :func:`run_clip_es_label`), the model loaded here.

    ``process(sample, data)`` runs the three stages of one image serially (``data``: its bytes as Ray Data
    read them, decoded by our decoder), exactly as the local serial job does.
    """
    args, affinity_fn = build
    vocab, _, items, model, cam_maker = _build(args, affinity_fn)
    stages = _label_stages(args, items, vocab, model, cam_maker, serial=True)

    def process(sample: Any, data: Optional[bytes]) -> Any:
        return stages.finish(stages.compute([stages.prepare(sample, data)])[0])

    return items, process


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


def _label_stages(args: argparse.Namespace, items: Any, vocab: Any, model: Any, cam_maker: Any,
                  serial: bool = False) -> Any:
    """The three stages of ``label`` (prepare an image, CAMs on the model's device, finish the mask);
    ``serial``: no worker processes (a Ray actor runs them one image at a time)."""
    from tag2mask.cmdline.options import overlap_settings
    from tag2mask.methods.clip_es.label_stages import ComputeCAMs, FinishMask, LabelSettings, PrepareImage
    from tag2mask.jobs.overlap import Stages
    from tag2mask.methods.clip_es.label_maps import LabelRefiner

    # COCO "file_name" and the manifest's "image" field are relative to the image folder
    # (a URI prefix stays a string: Path would fold its '//')
    image_root = items.image_dir if hasattr(items, "image_dir") else Path(items.root) / "JPEGImages"
    workers, batch_size = (0, 1) if serial else overlap_settings(args, model_device(model))
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
                   vocab: Any, engine: Any = None) -> int:
    """Run the items through ``stages`` into ``out`` (resumable), print the summary; the exit code."""

    def finalize(run_dir: Path, summary) -> None:
        if args.coco_json:
            from tag2mask.jobs.coco_export import write_coco_from_manifest

            record["coco_json"] = write_coco_from_manifest(run_dir, vocab.names, run_dir / "annotations.json")

    return run_item_job(args, items, stages, out, settings, record, finalize, "label", engine=engine)


def model_device(model):
    return next(model.parameters()).device
