"""CLIP-ZSS on the synthetic world: does the frozen CLIP teach the student the unseen classes? (CPU-sized)

Split ``synth-9-3``: the 12 object classes of the synthetic world, **ring, heart and hexagon unseen**
(their pixels ignored in training, their names never embedded before training ends); background is a
seen class. The shipped tiny CLIP is the teacher and the text encoder; the student is a SegFormer-b0
from scratch (no pretrained weights can be downloaded here).

Variants, all the same student, data, crops, optimiser, seed and budget (``--preset synth`` recipe):

* ``clip-zss``: GLM (CLS-bank InfoNCE) + PLM (K-means pseudo regions, synthesizer) + NEL + CE + BCE;
* ``seen-ce``: plain cross-entropy on the seen classes only (GLM, PLM and NEL off), the reference
  the issue asks for;
* ``glm-only`` and ``plm-only`` (to see which module carries the unseen classes),
  with ``--variants``.

Every student is then scored on the val split with the text embeddings of all 12 classes through the
student-only inference (mIoU of the seen and unseen classes, their harmonic mean hIoU). MaskCLIP with
the same tiny CLIP (the teacher used training-free, default preset) is scored on the same images as a
reference, and the inference speed (ms/image) of the trained student and of MaskCLIP is measured on
the same images, round-robin so that load drift hits both alike.

    PYTHONPATH=. python benchmarks/clip_zss_synth.py --out /tmp/zssbench       # ~30 min on 2 busy cores
    # or: the students in parallel processes, then the table (finished students are not retrained)
    PYTHONPATH=. python benchmarks/clip_zss_synth.py --out /tmp/zssbench --variants clip-zss --train-only &
    PYTHONPATH=. python benchmarks/clip_zss_synth.py --out /tmp/zssbench --variants seen-ce --train-only &
    wait; PYTHONPATH=. python benchmarks/clip_zss_synth.py --out /tmp/zssbench
    PYTHONPATH=. python benchmarks/clip_zss_synth.py --out /tmp/zssbench --iters 2000 --n-train 400 \\
        --variants clip-zss seen-ce glm-only plm-only

Prints a markdown table and writes OUT/results.json. Runs are resumed if OUT already holds them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "clip-zss": {},
    "seen-ce": {"use_glm": False, "use_plm": False, "nel_weight": 0.0},
    "glm-only": {"use_plm": False},
    "plm-only": {"use_glm": False},
}


def _export(data: Path, n_train: int, n_val: int, size: int) -> None:
    from tag2mask.cli.main import main

    if (data / "labels.json").is_file():
        return
    if main(["synth", "export", "--out", str(data), "--n", str(n_train), "--val", str(n_val), "--size", str(size),
             "--quiet"]) != 0:
        raise SystemExit("synth export failed")


def _train(out: Path, data: Path, variant: str, args: argparse.Namespace) -> dict:
    from tag2mask.clip.shipped import tiny_clip_path
    from tag2mask.data.segmentation import open_segmentation_data
    from tag2mask.methods.clip_zss.config import CLIP_ZSS_PRESETS, ClipZssConfig
    from tag2mask.vocab.zero_shot_splits import get_split
    from tag2mask.methods.clip_zss.train_task import ClipZssTask
    from tag2mask.engine.loop import RunOptions, train
    from tag2mask.methods.registry import segmenter_preset

    split = get_split("synth-9-3")
    preset = CLIP_ZSS_PRESETS["synth"]
    recipe = {**preset["segmenter"], "max_iters": args.iters, "batch_size": args.batch_size, "crop_size": args.crop}
    seg = segmenter_preset(None, classes=split.foreground, **recipe)
    zss = ClipZssConfig(split=split.name, unseen=split.unseen, background=split.background,
                        **{**preset["zss"], **VARIANTS[variant]})
    train_src = open_segmentation_data(data, "train", None, seg.num_classes)
    val_src = open_segmentation_data(data, "val", None, seg.num_classes)
    task = ClipZssTask(seg, zss, train_src, val_src, clip_weights=str(tiny_clip_path()))
    run = out / variant
    done = run / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    tic = time.time()
    summary = train(task, RunOptions(out_dir=str(run), device=args.device, seed=args.seed, ckpt_every=args.iters,
                                     log_every=50, progress=False, resume="auto"))
    seconds = time.time() - tic
    report = json.loads((run / "eval" / "eval.json").read_text())
    su = report["seen_unseen"]
    per_class = dict(zip(report["class_names"], report["scores"]["Class IoU"]))
    row = {"variant": variant, "train_s": seconds, "resumed_from": summary.get("start_iteration", 0),
            "miou_seen": su["mIoU_seen"], "miou_unseen": su["mIoU_unseen"], "hiou": su["hIoU"],
            "unseen_iou": {n: per_class.get(n) for n in split.unseen}, "run": str(run)}
    done.write_text(json.dumps(row, indent=2))
    return row


def _unseen_breakdown(run: Path, data: Path) -> dict:
    """Where the unseen classes' pixels go: their own class, another unseen class, background, a seen class."""
    from tag2mask.io.palette import read_label_png
    from tag2mask.vocab.zero_shot_splits import get_split

    split = get_split("synth-9-3")
    unseen = np.array(split.unseen_ids)
    counts = {"own class": 0, "other unseen": 0, "background": 0, "seen class": 0}
    for mask in sorted((run / "eval" / "masks").glob("*.png")):
        gt = read_label_png(data / "SegmentationClass" / mask.name)
        pred = read_label_png(mask)
        sel = np.isin(gt, unseen)
        g, p = gt[sel], pred[sel]
        counts["own class"] += int((p == g).sum())
        counts["other unseen"] += int((np.isin(p, unseen) & (p != g)).sum())
        counts["background"] += int((p == 0).sum())
        counts["seen class"] += int((~np.isin(p, unseen) & (p != 0)).sum())
    total = max(1, sum(counts.values()))
    return {k: v / total for k, v in counts.items()}


def _maskclip_and_speed(out: Path, data: Path, student_run: Path, reps: int, device: str) -> dict:
    """MaskCLIP (tiny CLIP) scored on the val images; ms/image of it and of the student on the same images.

    MaskCLIP runs twice: with its default preset (short side 448, sliding window 224 / 112: the images
    are upscaled, as a user running ``tag2mask segment`` gets) and on the images as they are (whole,
    the student's input size).
    """
    import torch
    from PIL import Image

    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.shipped import tiny_clip_path
    from tag2mask.data.images import load_image_array
    from tag2mask.evaluation.miou import ConfusionMatrix, seen_unseen_scores
    from tag2mask.io.palette import read_label_png
    from tag2mask.methods.clip_zss.inference import ZeroShotStudent
    from tag2mask.vocab.zero_shot_splits import get_split
    from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
    from tag2mask.vocab.vocabulary import get_vocabulary

    split = get_split("synth-9-3")
    names = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    images = [load_image_array(next((data / "JPEGImages").glob(f"{n}.*"))) for n in names]
    gts = [read_label_png(data / "SegmentationClass" / f"{n}.png") for n in names]
    clip = load_clip(str(tiny_clip_path()), device=device)
    maskclips = {
        "MaskCLIP, default preset (short side 448, slide 224/112)":
            OpenVocabSegmenter(clip, get_vocabulary("synth"), "maskclip", text_cache=False),
        "MaskCLIP at the images' own size (whole)":
            OpenVocabSegmenter(clip, get_vocabulary("synth"), "maskclip", text_cache=False, short_side=None,
                               mode="whole"),
    }
    student = ZeroShotStudent(student_run, device=device)
    assert student.class_names == split.class_names
    quality = {}
    with torch.no_grad():
        for key, seg in maskclips.items():
            cm = ConfusionMatrix(len(split.class_names))
            for rgb, gt in zip(images, gts):
                cm.update(seg.predict(Image.fromarray(rgb)).label.astype(np.uint8), gt)
            seen, unseen, hiou = seen_unseen_scores(cm.scores()["Class IoU"], split.unseen_ids)
            quality[key] = {"miou_seen": seen, "miou_unseen": unseen, "hiou": hiou}
    jobs = {"CLIP-ZSS student alone": lambda rgb: student.predict(rgb)}
    for key, seg in maskclips.items():
        jobs[key] = lambda rgb, seg=seg: seg.predict(Image.fromarray(rgb))
    totals: dict[str, list[float]] = {k: [] for k in jobs}
    with torch.no_grad():
        for fn in jobs.values():
            fn(images[0])  # warm-up
        for _ in range(reps):  # round-robin: load drift hits every method alike
            for key, fn in jobs.items():
                tic = time.perf_counter()
                for rgb in images:
                    fn(rgb)
                totals[key].append((time.perf_counter() - tic) * 1000.0 / len(images))
    return {"maskclip": quality, "ms_per_image": {k: min(v) for k, v in totals.items()}, "images": len(images),
            "image_size": list(images[0].shape[:2]),
            "student_parameters": sum(p.numel() for p in student.model.parameters()),
            "clip_image_parameters": sum(p.numel() for p in clip.visual.parameters())}


def _paper_scale_speed(reps: int, size: int, device: str) -> dict:
    """ms/image at the paper's scale with random weights (same FLOPs as the real networks).

    MaskCLIP on a ViT-B/16-sized CLIP against SegFormer-b0 / -b2 students with the cosine text head
    (the student-alone inference path), all on one ``size`` x ``size`` image, whole-image mode, 20
    class names; round-robin, best of ``reps``.
    """
    import torch
    from PIL import Image

    from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
    from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
    from tag2mask.models import build_segmenter
    from tag2mask.segmenter.evaluation import predict_logits
    from tag2mask.methods.registry import segmenter_preset
    from tag2mask.vocab.vocabulary import Vocabulary

    torch.manual_seed(0)
    names = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
             "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor"]
    clip = CLIP(CLIPConfig(embed_dim=512, vision=VisionConfig(768, 12, 12, 224, 16), text=TextConfig(512, 12, 8)))
    clip = clip.to(device).eval()
    maskclip = OpenVocabSegmenter(clip, Vocabulary.from_names(names), "maskclip", short_side=None, mode="whole",
                                  templates="photo", text_cache=False)  # one template: the text side is not timed
    rgb = np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    config = segmenter_preset(None, classes=tuple(names), test_mode="whole")
    jobs = {"MaskCLIP, ViT-B/16 CLIP": lambda: maskclip.predict(image)}
    params = {"MaskCLIP, ViT-B/16 CLIP": sum(p.numel() for p in clip.visual.parameters())}
    for variant in ("b0", "b2"):
        model = build_segmenter("segformer", len(names), text_embeddings=torch.randn(len(names), 512),
                                text_head={"similarity": "cosine"}, variant=variant).to(device).eval()
        key = f"student SegFormer-{variant} + text head"
        jobs[key] = lambda model=model: predict_logits(model, rgb, config).softmax(0).argmax(0)
        params[key] = sum(p.numel() for p in model.parameters())
    best = {k: float("inf") for k in jobs}
    with torch.no_grad():
        for fn in jobs.values():
            fn()
        for _ in range(reps):
            for key, fn in jobs.items():
                tic = time.perf_counter()
                fn()
                best[key] = min(best[key], (time.perf_counter() - tic) * 1000.0)
    return {"size": size, "ms": best, "parameters": params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=60)
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["clip-zss", "seen-ce"], choices=tuple(VARIANTS),
                    help="students to train (a finished one is read from OUT/VARIANT/bench.json)")
    ap.add_argument("--train-only", action="store_true",
                    help="train the variants and stop (to train them in parallel processes, then tabulate)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription on busy cores)")
    ap.add_argument("--reps", type=int, default=3, help="timing passes over the val images (best is kept)")
    ap.add_argument("--paper-size", type=int, default=224,
                    help="image side of the random-weight ViT-B/16 MaskCLIP vs SegFormer timing (0: skip it)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    _export(data, args.n_train, args.n_val, args.size)
    rows = [_train(out, data, v, args) for v in args.variants]
    for r in rows:
        r["unseen_pixels_to"] = _unseen_breakdown(Path(r["run"]), data)
    if args.train_only:
        return 0
    ref = _maskclip_and_speed(out, data, out / "clip-zss", args.reps, args.device)
    paper = _paper_scale_speed(args.reps, args.paper_size, args.device) if args.paper_size else None
    result = {"rows": rows, "reference": ref, "paper_scale_speed": paper, "iterations": args.iters, "batch_size": args.batch_size,
              "crop": args.crop, "n_train": args.n_train, "n_val": args.n_val, "size": args.size,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device}
    (out / "results.json").write_text(json.dumps(result, indent=2))

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    print(f"synth-9-3 (unseen: ring, heart, hexagon), {args.n_train} train / {args.n_val} val images of "
          f"{args.size} px; SegFormer-b0 student from scratch ({ref['student_parameters']:,} parameters), {args.iters} "
          f"iterations of batch {args.batch_size} at {args.crop} px, teacher = shipped tiny CLIP; {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| student trained with | mIoU(S) | mIoU(U) | hIoU | IoU ring / heart / hexagon | training time |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        u = " / ".join(pct(r["unseen_iou"][n]) for n in ("ring", "heart", "hexagon"))
        print(f"| {r['variant']} | {pct(r['miou_seen'])} | {pct(r['miou_unseen'])} | {pct(r['hiou'])} | {u} | "
              f"{r['train_s'] / 60:.1f} min{' (resumed)' if r['resumed_from'] else ''} |")
    for key, m in ref["maskclip"].items():
        print(f"| ({key}; tiny CLIP, training-free) | {pct(m['miou_seen'])} | {pct(m['miou_unseen'])} | "
              f"{pct(m['hiou'])} | | |")
    print("\nwhere the val pixels of the unseen classes go (share of those pixels):\n")
    kinds = list(rows[0]["unseen_pixels_to"])
    print("| student | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{100 * r['unseen_pixels_to'][k]:.0f} %" for k in kinds) + " |")
    print(f"\ninference on the same {ref['images']} val images ({ref['image_size'][0]}x{ref['image_size'][1]}), "
          f"best of {args.reps} passes (student {ref['student_parameters']:,} parameters; CLIP image tower "
          f"{ref['clip_image_parameters']:,}):\n")
    print("| | ms / image |")
    print("|---|---:|")
    for key, ms in ref["ms_per_image"].items():
        print(f"| {key} | {ms:.1f} |")
    if paper:
        print(f"\nat the paper's scale, random weights, one {paper['size']}x{paper['size']} image, whole, 20 classes, best of "
              f"{args.reps}:\n")
        print("| | parameters | ms / image |")
        print("|---|---:|---:|")
        for key, ms in paper["ms"].items():
            print(f"| {key} | {paper['parameters'][key] / 1e6:.1f} M | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
