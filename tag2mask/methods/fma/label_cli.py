"""``tag2mask label --method fma``: FMA-WSSS seeds from learned prompts (the FMA parts of ``label``).

Per image: CAMs of the image's labels from the prompts of ``--prompts RUN`` with that stage's CAA
(:class:`tag2mask.methods.fma.inference.FMACams`), then either SAM-based seeding over mask proposals
(``--proposals sam | slic | felzenszwalb | DIR``, :mod:`tag2mask.proposals`) or plain CAM labels
(``--proposals none``: background ``(1 - max score)^alpha``). Output layout as CLIP-ES's:
``masks/<name>.png``, ``cams/<name>.npz`` (``keys``, ``cams`` (K, H, W) float16 scores), optional
``arrays/`` and ``proposals/``, ``run.json``, ``manifest.jsonl``, ``logs/``.

The job runs as ``label``'s overlapped stages (:class:`tag2mask.jobs.overlap.Stages`, ``--workers``):
``label``'s own :class:`~tag2mask.methods.clip_es.label_stages.PrepareImage` (decode, ``--max-pixels``), then
:class:`ComputeFMA` on the device (CAMs; SAM proposals) and :class:`FinishFMA` in a CPU worker
(superpixels / proposal files, the seed map, the writes).
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tag2mask.cmdline import option_types as ot
from tag2mask.cmdline.items import open_items, run_item_job
from tag2mask.cmdline.options import reject_options

__all__ = ["add_label_options", "check_label_options", "FMA_ONLY", "run_label", "ComputeFMA", "FinishFMA",
           "FinishSettings", "FMAComputed", "RAY_ENGINE", "build_ray_worker"]

#: ``label --method fma --engine ray`` runs (:func:`build_ray_worker`)
RAY_ENGINE = True


#: options only ``--method fma`` uses (so they are errors with CLIP-ES)
FMA_ONLY = ("prompts", "proposals", "alpha", "sam_weights", "sam_preset", "points_per_side", "points_per_batch",
            "n_segments", "compactness", "scale", "min_size", "sigma", "save_proposals")
#: CLIP-ES options that do not apply to FMA-WSSS
_CLIP_ES_ONLY = ("refine", "box_threshold", "bg_power", "confidence", "template", "scales", "flip", "compat", "classes",
                 "precision")


def add_label_options(p: argparse.ArgumentParser) -> None:
    """``label``'s FMA-WSSS options (registry hook of ``label --method fma``)."""
    g = p.add_argument_group("FMA-WSSS (--method fma): seeds from learned prompts, see docs/fma.md")
    g.add_argument("--prompts", default=None, metavar="RUN",
                   help="a `tag2mask train fma` run folder (or its prompts.safetensors); its classes, CLIP, CAA and "
                        "alpha are used")
    g.add_argument("--proposals", default=None,
                   help="sam | slic | felzenszwalb | a folder of <name>.json COCO-RLE masks | none (plain CAM labels); "
                        "default none. FMA-WSSS's seeds use sam")
    g.add_argument("--alpha", type=ot.finite_float(0, 100, lo_open=True), default=None,
                   help="background score (1 - max)^alpha (default: the run's stage, VOC 0.6 cls / 0.7 seg)")
    g.add_argument("--save-proposals", action="store_true", help="also write computed proposals to OUT/proposals/<name>.json")
    g.add_argument("--sam-weights", default=None, help="--proposals sam: a Hugging Face SamModel folder or hub id")
    g.add_argument("--sam-preset", default=None, choices=("fma", "sam"),
                   help="--proposals sam: fma (FMA-WSSS's level-aware generator, default) or sam (stock)")
    g.add_argument("--points-per-side", type=ot.positive_int(1024), default=None, help="--proposals sam: point grid per side (32)")
    g.add_argument("--points-per-batch", type=ot.positive_int(ot.MAX_BATCH), default=None, help="--proposals sam: points per decoder call (64)")
    g.add_argument("--n-segments", type=ot.positive_int(1_000_000), default=None, help="--proposals slic: about this many superpixels (100)")
    g.add_argument("--compactness", type=ot.finite_float(0, 10_000, lo_open=True), default=None, help="--proposals slic: colour vs space (10)")
    g.add_argument("--scale", type=ot.finite_float(0, 100_000, lo_open=True), default=None, help="--proposals felzenszwalb: segment scale (100)")
    g.add_argument("--min-size", type=ot.non_negative_int(10_000_000), default=None, help="--proposals felzenszwalb: minimum segment size (50)")
    g.add_argument("--sigma", type=ot.finite_float(0, 100), default=None, help="--proposals slic/felzenszwalb: smoothing (0.8)")


def check_label_options(args: argparse.Namespace) -> None:
    """FMA options are errors without ``--method fma``; CLIP-ES options are errors with it."""
    if args.method != "fma":
        reject_options(args, FMA_ONLY, f"to --method {args.method} (only to --method fma)")
        return
    reject_options(args, _CLIP_ES_ONLY, "to --method fma (the prompts run fixes the classes, CAA and numerics; "
                                        "seeds come from --proposals)")
    if args.prompts is None:
        raise ValueError("--method fma needs --prompts RUN (a `tag2mask train fma` run folder)")
    if args.labels is not None:
        reject_options(args, ("split",), "with --labels (the label file lists the images)")
    kind = _proposal_kind(args)
    if kind != "sam":
        reject_options(args, ("sam_weights", "sam_preset", "points_per_side", "points_per_batch"),
                       f"to --proposals {args.proposals or 'none'} (only to sam)")
    if kind != "slic":
        reject_options(args, ("n_segments", "compactness"), f"to --proposals {args.proposals or 'none'} (only to slic)")
    if kind != "felzenszwalb":
        reject_options(args, ("scale", "min_size"), f"to --proposals {args.proposals or 'none'} (only to felzenszwalb)")
    if kind not in ("slic", "felzenszwalb"):
        reject_options(args, ("sigma",), f"to --proposals {args.proposals or 'none'} (only to slic, felzenszwalb)")
    if kind in ("none", "files"):
        reject_options(args, ("save_proposals",), f"to --proposals {args.proposals or 'none'} (nothing is computed)")
    if kind == "sam" and not args.sam_weights:
        raise ValueError("--proposals sam needs --sam-weights (a Hugging Face SamModel folder or hub id); "
                         "or use --proposals slic, which needs no model")
    if args.alpha is not None and not args.alpha > 0:
        raise ValueError(f"--alpha must be > 0, got {args.alpha}")


def _proposal_kind(args: argparse.Namespace) -> str:
    from tag2mask.cmdline.proposal_sources import proposal_kind

    spec = args.proposals or "none"
    return "none" if spec == "none" else proposal_kind(spec)


def _load_model(args: argparse.Namespace, config, ctx, meta: dict):
    """The run's CLIP (or ``--weights``, which must be the same model) with the learned prompts."""
    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.numerics import NUMERICS
    from tag2mask.runtime import resolve_device
    from tag2mask.methods.fma.prompt_run import build_model

    recorded = (meta.get("clip") or {})
    weights = args.weights or recorded.get("weights")
    if not weights:
        raise ValueError(f"--prompts {args.prompts}: the run does not name its CLIP weights; pass --weights")
    if args.weights is None and not Path(weights).exists():
        raise FileNotFoundError(f"--prompts {args.prompts} was trained with the CLIP {weights}, which is not there "
                                "any more; pass --weights with the same model")
    numerics = NUMERICS[config.stage.numerics]
    clip = load_clip(weights, device=resolve_device(args.device), round_fp16_weights=numerics.round_weights_fp16,
                     allow_download=True if args.allow_download else None)
    expected = recorded.get("fingerprint")
    if expected and getattr(clip, "fingerprint", None) and clip.fingerprint != expected:
        raise ValueError(f"--weights {weights} is not the CLIP the prompts of {args.prompts} were learned on "
                         f"(fingerprint {clip.fingerprint}, the run recorded {expected})")
    return clip, build_model(config, clip, ctx)


@dataclass
class FMAComputed:
    """FMA output of one image for the finish stage: CAMs (and SAM proposals, made on the device)."""

    name: str
    result: Any  # tag2mask.methods.fma.inference.FMACamResult
    rgb: Any  # (h, w, 3) uint8 at the processed size
    info: dict
    size: tuple  # original (width, height)
    proposals: Any = None


class ComputeFMA:
    """Stage 2 (this process, the device): FMA CAMs of a batch of prepared images, one at a time
    (``FMACams`` works per image, as the official inference), plus SAM's proposals when those are
    the source (SAM needs the device; superpixels and files are left to the finish stage)."""

    def __init__(self, cams, save_arrays: bool, device_proposals=None) -> None:
        self.cams, self.save_arrays, self.device_proposals = cams, save_arrays, device_proposals

    def __call__(self, batch: Sequence[Any]) -> list[FMAComputed]:
        import numpy as np

        from tag2mask.jobs.items import ItemError
        from tag2mask.proposals.base import ProposalError

        out = []
        for prepared in batch:
            result = self.cams(prepared.image, prepared.label_ids, keep_arrays=self.save_arrays)
            rgb = np.array(prepared.image.convert("RGB"), dtype=np.uint8)
            props = None
            if self.device_proposals is not None:
                try:
                    props = self.device_proposals(rgb, prepared.name)
                except ProposalError as e:
                    raise ItemError("proposals", str(e)) from e
            out.append(FMAComputed(prepared.name, result, rgb, prepared.info, prepared.size, props))
        return out


@dataclass(frozen=True)
class FinishSettings:
    """What the finish stage needs (plain data: it is sent to every worker)."""

    out: str
    alpha: float
    proposals: str  # 'none' | 'sam' | 'slic' | 'felzenszwalb' | 'files'
    proposal_options: dict
    save_arrays: bool
    save_proposals: bool


class FinishFMA:
    """Stage 3 (CPU, a worker): SAMS seeds over the proposals (built in the worker on first use) or
    plain CAM labels, the mask at the original size, atomic writes of mask, CAMs, arrays, proposals."""

    def __init__(self, settings: FinishSettings) -> None:
        self.settings = settings
        self._source = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "_source": None}  # rebuilt where it runs

    def _proposals(self, item: FMAComputed):
        from tag2mask.cmdline.proposal_sources import build_source
        from tag2mask.jobs.items import ItemError
        from tag2mask.proposals.base import ProposalError

        if item.proposals is not None:
            return item.proposals
        if self._source is None:
            self._source = build_source(argparse.Namespace(**self.settings.proposal_options), self.settings.proposals,
                                        "cpu")
        try:
            return self._source(item.rgb, item.name)
        except ProposalError as e:
            raise ItemError("proposals", str(e)) from e

    def __call__(self, item: FMAComputed) -> Any:
        import numpy as np
        from PIL import Image

        from tag2mask.jobs.items import ItemError, ItemOutput
        from tag2mask.localization.labels import cams_to_labels
        from tag2mask.proposals.seeding import seed_from_proposals

        s, result, info = self.settings, item.result, dict(item.info)
        outputs: list[Path] = []
        if s.proposals == "none":
            label = cams_to_labels(result.cams, result.keys, bg_power=s.alpha)
        else:
            props = self._proposals(item)
            if props.image_size != item.rgb.shape[:2]:
                raise ItemError("proposals", f"{item.name}: proposals are {props.image_size} but the image is "
                                f"{item.rgb.shape[:2]}")
            label = seed_from_proposals(result.refined, result.keys, props, s.alpha).seed
            info["proposals"] = len(props)
            if s.save_proposals:
                from tag2mask.proposals.rle_files import write_proposals_json

                prop_path = Path(s.out) / "proposals" / f"{item.name}.json"
                write_proposals_json(prop_path, props)
                outputs.append(prop_path)
        width, height = item.size
        if label.shape != (height, width):
            label = np.asarray(Image.fromarray(np.asarray(label, np.uint8)).resize((width, height), Image.NEAREST))
        return ItemOutput(outputs + self._write(item.name, label, result), info)

    def _write(self, stem: str, label, result) -> list[Path]:
        from tag2mask.methods.clip_es.label_stages import write_label_files

        arrays = result.arrays if self.settings.save_arrays else None
        return write_label_files(Path(self.settings.out), stem, label, result.keys, result.cams, arrays)


#: what the worker processes import once, before the first image
_WORKER_PRELOAD = ("numpy", "PIL.Image", "torch", "tag2mask.methods.clip_es.label_stages", "tag2mask.methods.fma.label_cli",
                   "tag2mask.proposals.seeding")
#: the command-line options the proposal sources read (tag2mask.cmdline.proposal_sources.build_source)
_PROPOSAL_OPTIONS = ("proposals", "n_segments", "compactness", "scale", "min_size", "sigma", "sam_preset",
                     "points_per_side", "points_per_batch", "sam_weights", "allow_download")


@dataclass
class _Built:
    """What :func:`_build` makes from checked ``args`` (the driver's, and each Ray actor's own)."""

    config: Any  # the prompts run's FMAConfig
    class_names: list
    items: Any
    clip: Any
    stages: Any  # tag2mask.jobs.overlap.Stages
    described: str  # the proposal source, as the settings record it
    alpha: float


def _build(args: argparse.Namespace, serial: bool = False) -> _Built:
    """The prompts run, the items, CLIP with the prompts and the three stages of checked ``args``;
    ``serial``: no worker processes (a Ray actor runs them one image at a time)."""
    from tag2mask.cmdline.options import overlap_settings
    from tag2mask.cmdline.proposal_sources import build_source
    from tag2mask.methods.fma.inference import FMACams
    from tag2mask.methods.fma.prompt_run import load_prompts

    config, ctx, meta = load_prompts(args.prompts)
    class_names = list(config.class_names)
    args.classes = config.preset  # named in the vocabulary messages of the shared item readers
    items = _open_items(args, class_names)
    clip, model = _load_model(args, config, ctx, meta)
    device = next(clip.parameters()).device
    kind = _proposal_kind(args)
    # SAM runs on the device in the compute stage; superpixels / files are built in the finish stage
    sam = build_source(args, kind, device) if kind == "sam" else None
    described = sam.describe() if sam is not None else (
        "none" if kind == "none" else build_source(args, kind, "cpu").describe())
    alpha = args.alpha if args.alpha is not None else config.stage.bg_alpha
    workers, batch_size = (0, 1) if serial else overlap_settings(args, device)
    compute = ComputeFMA(FMACams(model, config.stage.caa), args.save_arrays, sam)
    stages = _fma_stages(args, items, class_names, alpha, kind, compute, workers, batch_size)
    return _Built(config, class_names, items, clip, stages, described, alpha)


def build_ray_worker(args: argparse.Namespace) -> tuple:
    """In a Ray actor: ``(items, process)`` of ``label --method fma`` from the command's checked ``args``,
    CLIP and the prompts loaded here; ``process(sample, data)`` runs the three stages of one image serially
    (``data``: its bytes as Ray Data read them, decoded by our decoder), as the local serial job does."""
    built = _build(args, serial=True)
    stages = built.stages

    def process(sample: Any, data: Any) -> Any:
        return stages.finish(stages.compute([stages.prepare(sample, data)])[0])

    return built.items, process


def run_label(args: argparse.Namespace) -> int:
    """``tag2mask label --method fma`` (options already checked by :func:`check_label_options`)."""
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
    from tag2mask.evaluation.miou import DEFAULT_MIOU_RULE
    from tag2mask.version import __version__

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    engine = None
    if ray:
        from tag2mask.cmdline.options import ray_engine_from_args

        engine = ray_engine_from_args(args, "tag2mask.methods.fma.label_cli:build_ray_worker",
                                      lambda sample: sample.image_path)
    # with Ray the driver loads the model for its fingerprint (the settings guard); each actor builds its own
    built = _build(args, serial=ray)
    clip, class_names = built.clip, built.class_names
    settings = {
        "method": "fma", "prompts": str(Path(args.prompts).resolve()), "weights": clip.fingerprint,
        "proposals": built.described, "alpha": built.alpha,
        "save_arrays": args.save_arrays, "save_proposals": args.save_proposals, "max_pixels": args.max_pixels,
        "max_pixels_policy": args.max_pixels_policy,
    }
    warning = toy_model_warning(clip, [args.images])
    record = {
        "tag2mask": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "command": "label", "method": "fma", "settings": settings, "fma": built.config.to_dict(),
        "miou_rule": DEFAULT_MIOU_RULE, "classes": class_names, "weights": getattr(clip, "source_path", None),
        "device": str(next(clip.parameters()).device), "workers": built.stages.workers,
        "batch_size": built.stages.batch_size, "warnings": [warning] if warning else [],
    }
    if engine is not None:  # what ran: actors, threads per actor and Ray's start-up time
        record["engine"] = engine.stats

    def finalize(run_dir: Path, summary) -> None:
        if args.coco_json:
            from tag2mask.jobs.coco_export import write_coco_from_manifest

            record["coco_json"] = write_coco_from_manifest(run_dir, class_names, run_dir / "annotations.json")

    return run_item_job(args, built.items, built.stages, Path(args.out), settings, record, finalize, "label fma",
                        engine=engine)


def _open_items(args: argparse.Namespace, class_names: list[str]) -> Any:
    """The items to label, through ``label``'s reader; image labels outside the prompts' classes are an error
    that names the prompts run."""
    try:
        return open_items(args, class_names)
    except ValueError as exc:
        if "does not know" not in str(exc):
            raise
        raise ValueError(f"the image labels must be classes of the prompts run {args.prompts} "
                         f"({', '.join(class_names[:6])}{', ...' if len(class_names) > 6 else ''}): {exc}") from None


def _fma_stages(args: argparse.Namespace, items: Any, class_names: list[str], alpha: float, kind: str,
                compute: "ComputeFMA", workers: int, batch_size: int) -> Any:
    """The three stages of ``label --method fma``: ``label``'s image preparation, ``compute`` on the device,
    :class:`FinishFMA` (seeds, proposals, files)."""
    from tag2mask.jobs.overlap import Stages
    from tag2mask.methods.clip_es.label_stages import LabelSettings, PrepareImage

    out = Path(args.out)
    # (a URI prefix stays a string: Path would fold its '//')
    image_root = items.image_dir if hasattr(items, "image_dir") else Path(items.root) / "JPEGImages"
    prepare = PrepareImage(LabelSettings(
        class_names=tuple(class_names), image_root=str(image_root), out=str(out), max_decode_pixels=args.max_decode_pixels,
        max_pixels=args.max_pixels, max_pixels_policy=args.max_pixels_policy, save_arrays=args.save_arrays,
        refine="none", bg_power=alpha, confidence=None, compat=False))  # the last four: unused by PrepareImage
    finish = FinishFMA(FinishSettings(
        out=str(out), alpha=alpha, proposals=kind, proposal_options={k: getattr(args, k) for k in _PROPOSAL_OPTIONS},
        save_arrays=args.save_arrays, save_proposals=args.save_proposals))
    return Stages(prepare, compute, finish, workers=workers, batch_size=batch_size, preload=_WORKER_PRELOAD)
