"""``tag2mask segment --checkpoint RUN`` / ``--onnx MODEL.onnx``: a trained run (``train segmenter``, ``train
weclip``, ``train clip-zss``) or its exported graph over images, on the batch runner of ``segment``.

The run's engine task picks its predictor in :data:`tag2mask.methods.registry.RUN_PREDICTORS`; this module
names no method. ``--engine ray`` runs a trained run in Ray actors (:func:`build_ray_worker`: each actor
builds the run's predictor itself, from the checkpoint file the driver resolved).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tag2mask.cmdline.options import given, reject_options
from tag2mask.jobs.checkpoint import is_hf_name
from tag2mask.methods import registry

__all__ = ["check_checkpoint_options", "is_clip_zss_run", "CheckpointSegmenter", "run_checkpoint",
           "build_ray_worker"]


def check_checkpoint_options(args: argparse.Namespace, ovss_options: tuple[str, ...]) -> None:
    """With ``--checkpoint``: no open-vocabulary option (a CLIP-ZSS student takes ``--classes``), and
    ``--allow-download`` only for an ``hf://`` run name (it fetches the run, never CLIP weights)."""
    # a CLIP-ZSS student takes any class names; every other run brings its own classes
    allow = True if args.allow_download else None  # None: TAG2MASK_ALLOW_DOWNLOAD decides
    skip = ("classes",) if given(args, "classes") and is_clip_zss_run(args.checkpoint, allow) else ()
    reject_options(args, tuple(o for o in ovss_options if o not in skip),
                   "with --checkpoint (a trained run brings its own test settings; only a CLIP-ZSS "
                   "student takes --classes)")
    if not is_hf_name(args.checkpoint):
        reject_options(args, ("allow_download",), "with a local --checkpoint (it fetches hf://USER/REPO run names)")


def is_clip_zss_run(checkpoint: str, allow_download: "bool | None" = None) -> bool:
    """Whether ``checkpoint`` (file, run folder or ``hf://`` name) is a run whose predictor takes ``--classes``
    (a CLIP-ZSS student); ``False`` if unreadable."""
    try:
        from tag2mask.jobs.checkpoint import resolve_checkpoint
        from tag2mask.runs.layout import read_run_checkpoint

        task = read_run_checkpoint(resolve_checkpoint(checkpoint, allow_download)).get("task")
        return bool(getattr(registry.run_predictor(task), "takes_classes", False))
    except (OSError, ValueError, KeyError, RuntimeError, ImportError):
        return False  # the run is reported unreadable where it is loaded


class CheckpointSegmenter:
    """A trained run behind the ``predict(image) -> SegmentationResult`` interface; the run's engine task
    picks its predictor in :data:`tag2mask.methods.registry.RUN_PREDICTORS`."""

    def __init__(self, checkpoint: str, device: str, weights, crf: bool, classes=None, inner=None) -> None:
        from tag2mask.runs.layout import read_run_checkpoint

        if inner is None:  # an exported graph (--onnx) comes as ``inner``, with its kind
            task = read_run_checkpoint(checkpoint)["task"]
            inner = registry.run_predictor(task).from_run(checkpoint, device=device, weights=weights, crf=crf,
                                                          classes=classes)
        self.inner, self.kind = inner, getattr(inner, "kind", None) or task
        self.class_names = tuple(self.inner.class_names)
        self.has_background = bool(self.inner.has_background)
        self.device = self.inner.device

    def predict(self, image):
        """``image``: RGB PIL image -> :class:`~tag2mask.methods.ovss.segmenter.SegmentationResult` (label
        ``(H, W)`` uint8, probabilities ``(C, H, W)`` float32)."""
        from tag2mask.methods.ovss.segmenter import SegmentationResult

        label, probs = self.inner.predict(image)
        return SegmentationResult(label=label, logits=probs, class_names=self.class_names,
                                  has_background=self.has_background)


def build_ray_worker(args: argparse.Namespace) -> tuple:
    """In a Ray actor: ``(files, process)`` of ``segment --checkpoint`` (``args.checkpoint``: the checkpoint
    file the driver resolved), the run's predictor built here; ``process(path, data)`` as the local engine's."""
    from tag2mask.cli.segment_job import ImageSegmenter, list_images, output_stems

    files = list_images(args.input)
    segmenter = CheckpointSegmenter(args.checkpoint, args.device, args.weights, args.crf, args.classes)
    return files, ImageSegmenter(segmenter, args, Path(args.out), output_stems(files))


def run_checkpoint(args: argparse.Namespace) -> int:
    """``segment --checkpoint`` / ``--onnx``: a trained run or an exported graph over a folder on the batch runner."""
    import hashlib

    from tag2mask.cli.segment_job import list_images, output_stems, run_segment_job
    from tag2mask.cmdline.options import toy_model_warning
    from tag2mask.jobs.checkpoint import resolve_checkpoint
    from tag2mask.jobs.distributed import device_for_rank
    from tag2mask.version import __version__

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    files = list_images(args.input)
    out = Path(args.out)
    engine = None
    if args.onnx:
        from tag2mask.export.onnx_runtime import OnnxSegmenter

        ckpt = Path(args.onnx)
        segmenter = CheckpointSegmenter(str(ckpt), "cpu", None, False, inner=OnnxSegmenter(ckpt))
    else:
        # a run folder: its newest checkpoint; an hf:// name: fetched with --allow-download / TAG2MASK_ALLOW_DOWNLOAD
        ckpt = resolve_checkpoint(args.checkpoint, True if args.allow_download else None)
        args.device = device_for_rank(args.device)
        if args.engine == "ray":
            from tag2mask.cmdline.options import ray_engine_from_args

            # the actors read the checkpoint file resolved here (an hf:// name is fetched once, by the driver)
            engine = ray_engine_from_args(args, "tag2mask.cli.segment_checkpoint:build_ray_worker", lambda path: path,
                                          build_args=argparse.Namespace(**(vars(args) | {"checkpoint": str(ckpt)})))
        # with Ray the driver loads the run too, for its classes and settings; each actor builds its own
        segmenter = CheckpointSegmenter(str(ckpt), args.device, args.weights, args.crf, args.classes)
    # the CLIP whose toy-ness the warning checks: a student's text encoder, else the network's frozen CLIP
    teacher = segmenter.inner.text_model() if hasattr(segmenter.inner, "text_model") else \
        getattr(getattr(segmenter.inner, "model", None), "clip", None)
    warning = toy_model_warning(teacher, [args.input])
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    settings = {"method": segmenter.kind, "checkpoint": digest, "crf": args.crf, "overlay": args.overlay,
                "save_logits": args.save_logits, "max_pixels": args.max_pixels,
                "max_pixels_policy": args.max_pixels_policy}
    if getattr(segmenter.inner, "takes_classes", False):  # the class names are part of what is segmented
        settings["classes"] = list(segmenter.class_names)
    stems = output_stems(files)
    record = {"tag2mask": __version__, "command": "segment", "input": str(args.input),
              "method": segmenter.kind, "settings": settings, "checkpoint": str(ckpt), "class_names": list(segmenter.class_names),
              "device": str(segmenter.device), "long_side": segmenter.inner.long_side,
              "scales": list(segmenter.inner.scales), "flip": segmenter.inner.flip,
              "warnings": [warning] if warning else []}
    if engine is not None:  # what ran: actors, threads per actor and Ray's start-up time
        record["engine"] = engine.stats
    return run_segment_job(args, files, stems, out, segmenter, settings, record, engine)
