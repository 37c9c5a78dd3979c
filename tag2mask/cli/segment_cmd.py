"""``tag2mask segment``: open-vocabulary segmentation of images with a frozen CLIP (no labels at all)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from tag2mask.cmdline.options import (
    add_device_option,
    add_engine_options,
    add_run_options,
    add_weights_options,
    check_engine_options,
    check_weights_options,
    record_given_options,
    reject_options,
)
from tag2mask.cli import segment_methods
from tag2mask.cli.segment_job import (  # noqa: F401  (IMAGE_SUFFIXES, list_images: segment's public names)
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    MAX_DECODE_PIXELS,
    ImageSegmenter,
    list_images,
    output_stems,
    run_segment_job,
)
from tag2mask.methods import registry
from tag2mask.cmdline import option_types as ot
from tag2mask.jobs.checkpoint import is_hf_name

# kept in step with tag2mask.methods.ovss (importing it here would load torch for every --help)
DATASET_CHOICES = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "city_scapes", "ade20k")
LAST_BLOCK_CHOICES = ("clip", "maskclip", "sclip", "clearclip", "naclip", "clip-reduced", "maskclip-reduced",
                      "sclip-reduced")
PRESET_TABLE = """presets (--preset; options given explicitly override single settings):
  method     preset     short side  window         logit scale  PAMR  weights
  any        default    448         slide 224/112  40 (clearclip 50)  off  as loaded
  sclip      published  336         slide 224/112  40           off   fp16-rounded
  naclip     published  336         slide 224/112  40           on    fp16-rounded
  clearclip  published  448         slide 448/224  50           off   fp16-rounded
  maskclip   published  512         whole          1 (cosine)   off   as loaded; MaskCLIP's mmseg numerics
{rows}
  default and published: probability threshold 0, no area threshold; published:DATASET adds that
  benchmark's official config (e.g. sclip published:voc21: logit scale 65, prob/area thresholds 0.1)."""


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment",
        help="segment images into free-form class names (training-free: " + ", ".join(registry.segment_methods()) + ")",
        description=(
            "Write a palette PNG label map per image (0 = background when background words or a probability "
            "threshold are given, then the classes in order), optionally an overlay with a legend and the "
            "per-class logits, plus OUT/run.json and OUT/manifest.jsonl. Runs on the batch-job runner: "
            "--resume, settings guard, per-item error records, torchrun sharding (docs/batch_jobs.md)."
        ),
        epilog=(
            "examples:\n"
            "  tag2mask segment photo.jpg --classes \"cat, dog; background: sky, grass, wall\" --out seg --overlay\n"
            "  tag2mask segment photos/ --classes names.txt --method naclip --pamr --weights ViT-B-16.pt --out seg\n"
            "  tag2mask segment photos/ --classes cls_voc21.txt --method sclip --preset published:voc21 --out seg\n"
            "name-set file: one class per line, comma-separated synonyms (class score = max over synonyms),\n"
            "and 'background: sky, wall, ...' lines for background words; official cls_*.txt files (SCLIP,\n"
            "NACLIP, ClearCLIP) are read as they are, line 1 = background where the dataset has one\n"
            "(see --first-line). See docs/open_vocabulary.md.\n"
            + PRESET_TABLE.format(rows=segment_methods.preset_rows()) + "\n"
            "scale out: torchrun --nproc-per-node 4 -m tag2mask segment ... (see docs/batch_jobs.md)\n"
            "exit code: 0 all images ok, 1 some images failed (listed in OUT/manifest.jsonl), 2 bad arguments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IMAGE_OR_FOLDER",
                   help="an image file or a folder of images (not recursive), or a URI of one or of a prefix: "
                        "s3://bucket/prefix, gs://..., file:///... (read through pyarrow.fs; docs/batch_jobs.md)")
    p.add_argument("--classes", default=None,
                   help="synth|voc|coco|voc-maskclip, a name-set FILE (e.g. cls_voc21.txt) or inline 'cat, dog|puppy; "
                        "background: sky, grass' (or ', background:' without ';') (required; with --checkpoint "
                        "the run's classes are used instead, except for a CLIP-ZSS student, which takes any class "
                        "names 'a, b, c': default the classes of its training data, seen and unseen)")
    p.add_argument("--checkpoint", default=None,
                   help="segment with a trained run instead (a checkpoint file or run folder from 'tag2mask train "
                        "weclip', 'train segmenter' or 'train clip-zss'): classes, test size and scales come from the "
                        "run (WeCLIP recipe: long side 512, scales 1 and 0.75, plus flip; synth runs: long side 224; "
                        "segmenter and clip-zss runs: their own test settings); the open-vocabulary options do not "
                        "apply; --weights then names the CLIP of a clip-zss run, whose text encoder embeds --classes "
                        "(default: the run's own; no image tower is loaded)")
    p.add_argument("--onnx", default=None, metavar="MODEL.onnx",
                   help="segment with a graph of 'tag2mask export --onnx' in onnxruntime (extra 'onnx'; its sidecar "
                        "MODEL.onnx.json brings classes and pre-processing; no torch model is built)")
    p.add_argument("--crf", action="store_true", help="with --checkpoint only: dense CRF with WeCLIP's parameters (extra 'crf')")
    p.add_argument("--method", default="naclip", choices=registry.segment_methods(), help="method (default: naclip; which to pick: docs/open_vocabulary.md)")
    p.add_argument("--preset", default="default",
                   help="settings preset (default: default): 'default', 'published' (the method's official harness, "
                        "proven against the official code), or 'published:DATASET' (plus that benchmark's official "
                        f"config; DATASET one of {', '.join(DATASET_CHOICES)}). Options below override single settings")
    p.add_argument("--out", required=True, help="output folder (masks/, overlays/, logits/, run.json, manifest.jsonl, logs/)")
    _add_preset_overrides(p)
    _add_output_options(p)
    add_weights_options(p)
    add_device_option(p)
    add_run_options(p)
    add_engine_options(p, workers=True)
    p.set_defaults(func=run)
    record_given_options(p)
    return p


def _add_preset_overrides(p: argparse.ArgumentParser) -> None:
    """Options that override single settings of the preset (None: the preset's)."""
    p.add_argument("--mode", default=None, choices=("whole", "slide"), help="whole image or sliding window (default: preset's, slide)")
    p.add_argument("--short-side", type=ot.non_negative_int(ot.MAX_SIDE, note="0 keeps the size"), default=None,
                   help="resize so the short side is this, 0 keeps the size (default: preset's; see the table below)")
    p.add_argument("--crop", type=ot.positive_int(ot.MAX_SIDE), default=None, help="sliding-window crop (default: preset's)")
    p.add_argument("--stride", type=ot.positive_int(ot.MAX_SIDE), default=None, help="sliding-window stride (default: preset's)")
    p.add_argument("--prob-threshold", type=ot.finite_float(0, 1), default=None,
                   help="pixels whose best class probability is below this become background (default: preset's, 0)")
    p.add_argument("--area-threshold", type=ot.finite_float(0, 1), default=None,
                   help="SCLIP's rule: zero the classes covering at most this fraction of the foreground (default: preset's, off)")
    p.add_argument("--logit-scale", type=ot.finite_float(0, 10_000, lo_open=True), default=None, help="softmax temperature (default: preset's)")
    p.add_argument("--templates", default=None,
                   help="prompt templates: imagenet80, maskclip85, photo, or one template with '{}' (default: preset's)")
    p.add_argument("--last-block", default=None, choices=LAST_BLOCK_CHOICES,
                   help="run another last-block variant in the method's harness, e.g. clip-reduced = the model_type "
                        "'vanilla' that ClearCLIP's shipped config runs (default: the method's own)")
    p.add_argument("--compat", action=argparse.BooleanOptionalAction, default=None,
                   help="the method's official numerics (MaskCLIP: eps 1e-6, erf GELU, ImageNet mean/std, ...); "
                        "--no-compat: the loaded model as it is (default: preset's)")
    p.add_argument("--pamr", action=argparse.BooleanOptionalAction, default=None,
                   help="refine with PAMR, 10 steps, dilations 8 and 16 (default: preset's; on for NACLIP's published)")
    _add_window_options(p)
    segment_methods.add_options(p)  # the options of the methods that bring their own (registry)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """How name-set files are read, what is written, and the image-size guards."""
    p.add_argument("--first-line", default="auto", choices=("auto", "background", "class"),
                   help="official cls_*.txt name sets only: whether line 1 lists the background words "
                        "(default: auto = when it is 'background' or a list of stuff words such as sky, wall, tree)")
    p.add_argument("--overlay", action="store_true", help="also write OUT/overlays/<stem>.png with a legend")
    p.add_argument("--save-logits", action="store_true", help="also write OUT/logits/<stem>.npz (per-class logits and probabilities, float32)")
    p.add_argument("--max-pixels", type=ot.positive_int(ot.MAX_PIXELS), default=DEFAULT_MAX_PIXELS,
                   help=f"largest image (width*height) segmented at full size (default {DEFAULT_MAX_PIXELS:,}); larger ones "
                        "are downscaled to fit (aspect kept) and their mask scaled back (nearest) to the original size; "
                        "logits stay at the processed size (manifest: processed_size)")
    p.add_argument("--max-pixels-policy", default="downscale", choices=("downscale", "refuse"),
                   help="an image above --max-pixels: downscale (default) or refuse it (an error record)")
    p.add_argument("--max-decode-pixels", type=ot.positive_int(ot.MAX_PIXELS), default=MAX_DECODE_PIXELS,
                   help=f"images above this many pixels are refused before decoding (decompression-bomb guard; "
                        f"default {MAX_DECODE_PIXELS:,})")


def _add_window_options(p: argparse.ArgumentParser) -> None:
    """NACLIP's window width and PAMR's schedule (settings the official harnesses record)."""
    p.add_argument("--naclip-std", type=ot.finite_float(0, 1000, lo_open=True), default=None,
                   help="NACLIP's Gaussian window width σ in patches (official gaussian_std; default: preset's, 5); "
                        "only where the last block is NACLIP's")
    p.add_argument("--pamr-steps", type=ot.positive_int(10_000), default=None, help="PAMR iterations (default: preset's, 10); needs PAMR on")
    p.add_argument("--pamr-dilations", type=ot.list_of(ot.positive_int(ot.MAX_SIDE)), default=None,
                   help="PAMR dilations, comma-separated (official pamr_stride; default: preset's, 8,16); needs PAMR on")


#: options of the open-vocabulary methods; a trained WeCLIP run (--checkpoint) takes none of them
_OVSS_OPTIONS = ("classes", "method", "preset", "mode", "short_side", "crop", "stride", "prob_threshold",
                 "area_threshold", "logit_scale", "templates", "last_block", "compat", "pamr", "first_line",
                 "naclip_std", "pamr_steps", "pamr_dilations") + segment_methods.option_dests()


def check_options(args: argparse.Namespace) -> None:
    """Options that do not apply to what was asked are errors, not silently ignored."""
    from tag2mask.cli.segment_checkpoint import check_checkpoint_options

    if not (args.checkpoint and is_hf_name(args.checkpoint)):  # --allow-download then fetches the hf:// run
        check_weights_options(args)
    check_engine_options(args)
    if args.engine == "ray":
        reject_options(args, ("onnx",), "with --engine ray (an exported graph runs in onnxruntime on this machine)")
    if args.onnx:
        reject_options(args, _OVSS_OPTIONS + ("checkpoint", "crf", "weights", "allow_download", "device"),
                       "with --onnx (the exported graph brings its classes and test settings; it runs on the CPU)")
    elif args.checkpoint:
        check_checkpoint_options(args, _OVSS_OPTIONS)
    else:
        reject_options(args, ("crf",), "without --checkpoint (the open-vocabulary methods use --pamr)")
        if args.mode == "whole":
            reject_options(args, ("crop", "stride"), "with --mode whole (no sliding window)")


def _settings(args: argparse.Namespace, vocab, model, segmenter) -> dict:
    """Everything that changes the outputs (the runner's --overwrite guard compares them)."""
    keys = ("method", "preset", "classes", "first_line", "mode", "short_side", "crop", "stride", "prob_threshold",
            "area_threshold", "logit_scale", "templates", "last_block", "compat", "pamr", "naclip_std", "pamr_steps",
            "pamr_dilations", "overlay", "save_logits", "max_pixels", "max_pixels_policy")
    s = {k: getattr(args, k) for k in keys}
    s.update(segment_methods.hooks_of(args.method).segment_settings(args, segmenter))
    # what actually runs once the preset and the options are combined
    s["resolved"] = segmenter.settings.to_dict()
    # --classes may name a file: record what it resolved to, so an edited file counts as a change
    s["vocabulary"] = {"names": list(vocab.names), "synonyms": [list(x) for x in vocab.synonyms],
                       "background": list(vocab.background), "mode": vocab.mode}
    s["weights"] = getattr(model, "fingerprint", None)
    return s


def _segmenter_options(args: argparse.Namespace) -> dict:
    """Keyword overrides of the preset: only the options given on the command line."""
    options = {
        "mode": args.mode, "crop": args.crop, "stride": args.stride, "prob_threshold": args.prob_threshold,
        "area_threshold": args.area_threshold, "logit_scale": args.logit_scale, "templates": args.templates,
        "compat": args.compat, "pamr": args.pamr, "last_block": args.last_block, "naclip_std": args.naclip_std,
        "pamr_steps": args.pamr_steps, "pamr_dilations": args.pamr_dilations,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if args.short_side is not None:
        options["short_side"] = args.short_side or None  # 0 keeps the image size
    return options


def run(args: argparse.Namespace) -> int:
    import torch

    from tag2mask.version import __version__
    from tag2mask.cmdline.options import toy_model_warning
    from tag2mask.jobs.distributed import device_for_rank

    check_options(args)
    if args.checkpoint or args.onnx:
        from tag2mask.cli.segment_checkpoint import run_checkpoint

        return run_checkpoint(args)
    # cheap checks first, so a typo fails before the model is loaded
    if args.classes is None:
        raise ValueError("--classes is required (or --checkpoint for a trained WeCLIP run)")
    if args.method not in registry.segment_methods():
        raise ValueError(f"unknown method {args.method!r}; choose one of {list(registry.segment_methods())}")
    if not str(args.classes).strip():
        raise ValueError("--classes is empty; give e.g. 'cat, dog; background: sky' or a name-set file")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    segment_methods.check_options(args)
    hooks = segment_methods.hooks_of(args.method)
    preset = hooks.segment_preset(args.method, args.preset)  # a bad preset name fails before the model is loaded
    first_line = {"auto": None, "background": True, "class": False}[args.first_line]
    vocab = hooks.segment_vocabulary(args.classes, first_line)
    files = list_images(args.input)
    out = Path(args.out)
    engine = None
    if args.engine == "ray":
        from tag2mask.cmdline.options import ray_engine_from_args

        engine = ray_engine_from_args(args, "tag2mask.cli.segment_cmd:build_ray_worker", lambda path: path)
    args.device = device_for_rank(args.device)
    # with Ray the driver loads the model for its fingerprint (the settings guard); each actor builds its own
    model, segmenter = _build(args, preset, vocab)
    warnings = [w for w in [toy_model_warning(model, [args.input])] + hooks.segment_warnings(model, preset) if w]
    if segmenter.settings.mode == "whole":  # a preset may choose the whole-image mode
        reject_options(args, ("crop", "stride"), f"with preset {segmenter.settings.name!r}, which runs whole images")
    if segmenter.settings.last_block != "naclip":
        reject_options(args, ("naclip_std",), f"with last block {segmenter.settings.last_block!r} (NACLIP's window only)")
    if not segmenter.settings.pamr:
        reject_options(args, ("pamr_steps", "pamr_dilations"), "without PAMR (add --pamr)")
    settings = _settings(args, vocab, model, segmenter)
    stems = output_stems(files)
    record = {
        "tag2mask": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "segment",
        "input": str(args.input),
        "settings": settings,
        "segmenter": repr(segmenter),
        # what ran, next to what was asked (settings): a preset or the method may change these
        "window": {"mode": segmenter.settings.mode, "short_side": segmenter.settings.short_side,
                   "crop": segmenter.settings.crop, "stride": segmenter.settings.stride},
        "preset": segmenter.settings.name,
        "logit_scale": segmenter.logit_scale,
        "templates": segmenter.templates if isinstance(segmenter.templates, str) else list(segmenter.templates),
        "class_names": list(segmenter.class_names),
        "label_values": {name: i for i, name in enumerate(segmenter.class_names)},
        "weights": getattr(model, "source_path", None),
        "weights_fingerprint": getattr(model, "fingerprint", None),
        "device": str(segmenter.device),
        "warnings": warnings,
    }
    if engine is not None:  # what ran: actors, threads per actor and Ray's start-up time
        record["engine"] = engine.stats
    return run_segment_job(args, files, stems, out, segmenter, settings, record, engine)


def _build(args: argparse.Namespace, preset, vocab) -> tuple:
    """``(model, segmenter)`` of checked ``args`` (the driver's, and each Ray actor's own)."""
    from tag2mask.clip.loading import round_weights_to_fp16
    from tag2mask.cmdline.options import load_model_from_args

    model = load_model_from_args(args)
    if preset.round_fp16_weights:
        # as the official loaders do; done here on the command's own model, so the segmenter needs no copy
        round_weights_to_fp16(model)
        model.fingerprint = f"{getattr(model, 'fingerprint', 'unknown')}:fp16r"
    hooks = segment_methods.hooks_of(args.method)
    return model, hooks.build_segmenter(model, vocab, args, preset, _segmenter_options(args))


def build_ray_worker(args: argparse.Namespace) -> tuple:
    """In a Ray actor: ``(files, process)`` from the command's checked ``args``, the model loaded here;
    ``process(path, data)`` segments one image from its bytes and writes its outputs atomically."""
    hooks = segment_methods.hooks_of(args.method)
    preset = hooks.segment_preset(args.method, args.preset)
    first_line = {"auto": None, "background": True, "class": False}[args.first_line]
    files = list_images(args.input)
    _, segmenter = _build(args, preset, hooks.segment_vocabulary(args.classes, first_line))
    return files, ImageSegmenter(segmenter, args, Path(args.out), output_stems(files))
