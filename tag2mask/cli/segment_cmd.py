"""``tag2mask segment``: open-vocabulary segmentation of images with a frozen CLIP (no labels at all)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from tag2mask.cli.common import add_device_option, add_run_options, add_weights_options

METHOD_CHOICES = ("maskclip", "sclip", "clearclip", "naclip")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment",
        help="segment images into free-form class names (MaskCLIP, SCLIP, ClearCLIP, NACLIP; training-free)",
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
            "name-set file: one class per line, comma-separated synonyms (class score = max over synonyms),\n"
            "and 'background: sky, wall, ...' lines for background words. See docs/open_vocabulary.md.\n"
            "scale out: torchrun --nproc-per-node 4 -m tag2mask segment ... (see docs/batch_jobs.md)\n"
            "exit code: 0 all images ok, 1 some images failed (listed in OUT/manifest.jsonl), 2 bad arguments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IMAGE_OR_FOLDER", help="an image file or a folder of images (not recursive)")
    p.add_argument("--classes", default=None,
                   help="inline 'cat, dog|puppy; background: sky, grass' or a name-set file (required unless --checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="segment with a trained run instead (a checkpoint file or run folder from 'tag2mask train "
                        "weclip' -- long side 512, scales {1, 0.75} + flip -- or 'tag2mask train segmenter' -- its "
                        "test settings); classes come from the run")
    p.add_argument("--crf", action="store_true", help="with --checkpoint: dense CRF with WeCLIP's parameters (extra 'crf')")
    p.add_argument("--method", default="naclip", choices=METHOD_CHOICES, help="last-block variant (default: naclip)")
    p.add_argument("--out", required=True, help="output folder (masks/, overlays/, logits/, run.json, manifest.jsonl, logs/)")
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
    add_weights_options(p)
    add_device_option(p)
    add_run_options(p)
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


def _settings(args: argparse.Namespace, vocab, model) -> dict:
    """Everything that changes the outputs (the runner's --overwrite guard compares them)."""
    keys = ("method", "classes", "mode", "short_side", "crop", "stride", "prob_threshold", "area_threshold",
            "logit_scale", "templates", "compat", "pamr", "overlay", "save_logits")
    s = {k: getattr(args, k) for k in keys}
    # --classes may name a file: record what it resolved to, so an edited file counts as a change
    s["vocabulary"] = {"names": list(vocab.names), "synonyms": [list(x) for x in vocab.synonyms],
                       "background": list(vocab.background), "mode": vocab.mode}
    s["weights"] = getattr(model, "fingerprint", None)
    return s


#: output folder -> the kind name used in run.json's per-image "outputs"
_OUTPUT_KINDS = {"masks": "mask", "overlays": "overlay", "logits": "logits"}


class _Segmenter:
    """``process_fn`` of the runner: one image path -> mask (+ overlay, + logits), written atomically."""

    def __init__(self, segmenter, args: argparse.Namespace, out: Path, stems: dict[Path, str]) -> None:
        self.segmenter, self.args, self.out, self.stems = segmenter, args, out, stems

    def __call__(self, path: Path):
        import numpy as np

        from tag2mask.data.images import load_image
        from tag2mask.jobs.runner import ItemOutput

        image = load_image(path)  # ImageDecodeError (unreadable, truncated, ...) -> a "decode" error record
        res = self.segmenter.predict(image)
        written = _write_outputs(self.out, self.stems[path], np.asarray(image, dtype=np.uint8), res, self.args)
        info = {"input": str(path), "size": [image.size[1], image.size[0]],
                "present": [res.class_names[v] for v in res.present()]}
        return ItemOutput(list(written.values()), info)


def _image_records(out: Path, files: list[Path], stems: dict[Path, str]) -> list[dict]:
    """run.json's per-image list (input order), rebuilt from the merged manifest."""
    from tag2mask.io.manifest import MANIFEST_NAME, latest_records

    records = latest_records([out / MANIFEST_NAME])
    images = []
    for f in files:
        rec = records.get(stems[f])
        if rec is None:  # not reached (--limit) or not in this run
            continue
        entry: dict = {"input": str(f), "status": rec.get("status")}
        if rec.get("status") == "ok":
            outputs = {}
            for rel in rec.get("outputs", []):
                p = Path(rel)
                outputs[_OUTPUT_KINDS.get(p.parent.name, p.parent.name)] = str(p if p.is_absolute() else out / p)
            entry.update(outputs=outputs, present=rec.get("present"), seconds=rec.get("seconds"))
        else:
            entry.update(error=rec.get("error"), error_kind=rec.get("error_kind"))
        images.append(entry)
    return images


def run(args: argparse.Namespace) -> int:
    import torch

    import tag2mask
    from tag2mask.cli.common import load_model_from_args
    from tag2mask.jobs.distributed import device_for_rank
    from tag2mask.methods.ovss.segmenter import METHODS, OpenVocabSegmenter
    from tag2mask.vocab.vocabulary import load_vocabulary

    if args.checkpoint:
        return _run_checkpoint(args)
    # cheap checks first, so a typo fails before the model is loaded
    if args.classes is None:
        raise ValueError("--classes is required (or --checkpoint for a trained WeCLIP run)")
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose one of {list(METHOD_CHOICES)}")
    if not str(args.classes).strip():
        raise ValueError("--classes is empty; give e.g. 'cat, dog; background: sky' or a name-set file")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    vocab = load_vocabulary(args.classes)
    files = list_images(Path(args.input))
    out = Path(args.out)

    args.device = device_for_rank(args.device)
    model = load_model_from_args(args)
    segmenter = OpenVocabSegmenter(
        model, vocab, args.method, templates=args.templates, compat=args.compat, mode=args.mode,
        short_side=args.short_side or None, crop=args.crop, stride=args.stride, logit_scale=args.logit_scale,
        prob_threshold=args.prob_threshold, area_threshold=args.area_threshold, pamr=args.pamr,
    )
    settings = _settings(args, vocab, model)
    stems = _output_stems(files)
    record = {
        "tag2mask": tag2mask.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "segment",
        "input": str(args.input),
        "settings": settings,
        "segmenter": repr(segmenter),
        "logit_scale": segmenter.logit_scale,
        "templates": segmenter.templates if isinstance(segmenter.templates, str) else list(segmenter.templates),
        "class_names": list(segmenter.class_names),
        "label_values": {name: i for i, name in enumerate(segmenter.class_names)},
        "weights": getattr(model, "source_path", None),
        "weights_fingerprint": getattr(model, "fingerprint", None),
        "device": str(segmenter.device),
    }
    return _run_job(args, files, stems, out, segmenter, settings, record)


def _run_job(args: argparse.Namespace, files: list[Path], stems: dict[Path, str], out: Path, segmenter,
             settings: dict, record: dict) -> int:
    """Run ``segmenter`` over ``files`` on the batch runner (manifest, resume, torchrun); exit code."""
    from tag2mask.jobs.runner import JobOptions, print_summary, process_exit_code, run_items

    def finalize(run_dir: Path, summary) -> None:
        record["images"] = _image_records(run_dir, files, stems)

    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="segment", unit="img")
    summary = run_items(files, _Segmenter(segmenter, args, out, stems), out, settings, options,
                        keys=[stems[f] for f in files], describe=lambda i: str(files[i]),
                        run_record=record, finalize=finalize)
    if not args.quiet or summary.failed:
        print_summary(summary, out, "segment")
    return process_exit_code(summary)


class _CheckpointSegmenter:
    """A trained WeCLIP or `train segmenter` run behind the ``predict(image) -> SegmentationResult`` interface."""

    def __init__(self, checkpoint: str, device: str, weights, crf: bool) -> None:
        from tag2mask.training.engine import read_run_checkpoint

        if read_run_checkpoint(checkpoint)["task"] == "segmenter":
            from tag2mask.training.segmenter_eval import TrainedSegmenter

            if weights is not None or crf:
                raise ValueError("--weights and --crf apply to WeCLIP checkpoints, not to a `train segmenter` run")
            self.inner = TrainedSegmenter(checkpoint, device=device)
            self.class_names = self.inner.class_names
            self.kind, self.has_background = "segmenter", bool(self.inner.config.background)
        else:
            from tag2mask.methods.weclip.inference import WeCLIPSegmenter

            self.inner = WeCLIPSegmenter(checkpoint, device=device, weights=weights, crf=crf)
            self.class_names = ("background",) + tuple(self.inner.config.classes)
            self.kind, self.has_background = "weclip", True
        self.device = self.inner.device

    def predict(self, image):
        from tag2mask.methods.ovss.segmenter import SegmentationResult

        label, probs = self.inner.predict(image)
        return SegmentationResult(label=label, logits=probs, class_names=self.class_names,
                                  has_background=self.has_background)


def _run_checkpoint(args: argparse.Namespace) -> int:
    """``segment --checkpoint``: WeCLIP inference over a folder on the same batch runner."""
    import hashlib

    import tag2mask
    from tag2mask.jobs.distributed import device_for_rank

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    from tag2mask.jobs.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)  # a run folder: its newest complete checkpoint
    files = list_images(Path(args.input))
    out = Path(args.out)
    args.device = device_for_rank(args.device)
    segmenter = _CheckpointSegmenter(str(ckpt), args.device, args.weights, args.crf)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    settings = {"method": segmenter.kind, "checkpoint": digest, "crf": args.crf, "overlay": args.overlay,
                "save_logits": args.save_logits}
    stems = _output_stems(files)
    record = {"tag2mask": tag2mask.__version__, "command": "segment", "input": str(args.input),
              "settings": settings, "checkpoint": str(ckpt), "class_names": list(segmenter.class_names),
              "device": str(segmenter.device)}
    return _run_job(args, files, stems, out, segmenter, settings, record)


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
