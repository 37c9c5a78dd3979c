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
    from tag2mask.methods.clip_zss.splits import get_split
    from tag2mask.training.clip_zss_task import ClipZssTask
    from tag2mask.training.engine import RunOptions, train
    from tag2mask.training.segmenter_task import segmenter_preset

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


def _maskclip_and_speed(out: Path, data: Path, student_run: Path, reps: int, device: str) -> dict:
    """MaskCLIP (tiny CLIP, default preset) scored on the val images; ms/image of it and of the student."""
    import torch
    from PIL import Image

    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.shipped import tiny_clip_path
    from tag2mask.data.images import load_image_array
    from tag2mask.evaluation.miou import ConfusionMatrix, seen_unseen_scores
    from tag2mask.io.palette import read_label_png
    from tag2mask.methods.clip_zss.inference import ZeroShotStudent
    from tag2mask.methods.clip_zss.splits import get_split
    from tag2mask.methods.ovss import OpenVocabSegmenter
    from tag2mask.vocab.vocabulary import get_vocabulary

    split = get_split("synth-9-3")
    names = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    images = [load_image_array(next((data / "JPEGImages").glob(f"{n}.*"))) for n in names]
    gts = [read_label_png(data / "SegmentationClass" / f"{n}.png") for n in names]
    maskclip = OpenVocabSegmenter(load_clip(str(tiny_clip_path()), device=device), get_vocabulary("synth"),
                                  "maskclip", text_cache=False)
    student = ZeroShotStudent(student_run, device=device)
    assert student.class_names == split.class_names
    cm = ConfusionMatrix(len(split.class_names))
    with torch.no_grad():
        for rgb, gt in zip(images, gts):
            cm.update(maskclip.predict(Image.fromarray(rgb)).label.astype(np.uint8), gt)
    seen, unseen, hiou = seen_unseen_scores(cm.scores()["Class IoU"], split.unseen_ids)
    jobs = {"student": lambda rgb: student.predict(rgb),
            "maskclip": lambda rgb: maskclip.predict(Image.fromarray(rgb))}
    totals = {k: [] for k in jobs}
    with torch.no_grad():
        for fn in jobs.values():
            fn(images[0])  # warm-up
        for _ in range(reps):
            for key, fn in jobs.items():
                tic = time.perf_counter()
                for rgb in images:
                    fn(rgb)
                totals[key].append((time.perf_counter() - tic) * 1000.0 / len(images))
    params = sum(p.numel() for p in student.model.parameters())
    clip_params = sum(p.numel() for p in maskclip.model.visual.parameters())
    return {"maskclip": {"miou_seen": seen, "miou_unseen": unseen, "hiou": hiou},
            "ms_per_image": {k: min(v) for k, v in totals.items()}, "images": len(images),
            "image_size": list(images[0].shape[:2]), "student_parameters": params, "clip_image_parameters": clip_params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=60)
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["clip-zss", "seen-ce"], choices=tuple(VARIANTS),
                    help="students to train (a finished one is read from OUT/VARIANT/bench.json)")
    ap.add_argument("--train-only", action="store_true",
                    help="train the variants and stop (to train them in parallel processes, then tabulate)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription on busy cores)")
    ap.add_argument("--reps", type=int, default=3, help="timing passes over the val images (best is kept)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    _export(data, args.n_train, args.n_val, args.size)
    rows = [_train(out, data, v, args) for v in args.variants]
    if args.train_only:
        return 0
    ref = _maskclip_and_speed(out, data, out / "clip-zss", args.reps, args.device)
    result = {"rows": rows, "reference": ref, "iterations": args.iters, "batch_size": args.batch_size,
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
    m = ref["maskclip"]
    print(f"| (MaskCLIP, tiny CLIP, training-free) | {pct(m['miou_seen'])} | {pct(m['miou_unseen'])} | "
          f"{pct(m['hiou'])} | | |")
    ms = ref["ms_per_image"]
    print(f"\ninference on the same {ref['images']} val images ({ref['image_size'][0]}x{ref['image_size'][1]}), best of "
          f"{args.reps}: student alone {ms['student']:.1f} ms/image, MaskCLIP (default preset: short side 448, "
          f"slide 224/112) {ms['maskclip']:.1f} ms/image ({ms['maskclip'] / ms['student']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
