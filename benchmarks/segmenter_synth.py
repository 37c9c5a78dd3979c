"""Does a network trained on CLIP-ES pseudo-labels beat the pseudo-labels? (synthetic world, CPU-sized)

Pipeline, all with tag2mask's own commands and the shipped tiny CLIP (no network weights to
download, so the students are small networks trained from scratch):

1. ``tag2mask synth export``: train / val / test splits in VOC layout with exact masks and tags;
2. ``tag2mask label`` (CLIP-ES: GradCAM + CAA + dense CRF, pixels below CRF confidence 0.95 → 255)
   on every split, with the image-level tags; the CRF labels *without* the 255 masking are scored
   (the paper's pseudo-mask mIoU), the masked ones are what the student trains on;
3. the training engine's segmenter task on the train split's pseudo-masks (no ground truth), and,
   as the reference that tells label quality from student capacity, the same network with the same
   budget on the train split's ground truth;
4. the students' predictions (images only, no tags) and the pseudo-labels scored against the ground
   truth on train, val and test.

    PYTHONPATH=. python benchmarks/segmenter_synth.py --out /tmp/segbench     # ~25 min on 2 busy CPU cores
    PYTHONPATH=. python benchmarks/segmenter_synth.py --out /tmp/segbench --device cuda --n-train 2000 \\
        --iters 8000 --model segformer --model-option variant=b0 --optimizer adamw --lr 6e-5 --crop 160 --size 224

Prints a table (markdown) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _cli(*argv: str) -> None:
    from tag2mask.cli.main import main

    rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): tag2mask {' '.join(argv)}")


def _score_pseudo(data: Path, seeds: Path, split: str, num_classes: int) -> dict[str, float]:
    """mIoU of the CRF labels without the confidence masking, and the share of confident pixels."""
    from tag2mask.evaluation.miou import ConfusionMatrix
    from tag2mask.io.palette import read_label_png

    cm = ConfusionMatrix(num_classes)
    kept, total = 0, 0
    names = (data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    for name in names:
        gt = read_label_png(data / "SegmentationClass" / f"{name}.png")
        with np.load(seeds / "arrays" / f"{name}.npz") as z:
            cm.update(z["crf_label_noignore"].astype(np.uint8), gt)
        mask = read_label_png(seeds / "masks" / f"{name}.png")
        kept += int((mask != 255).sum())
        total += mask.size
    s = cm.scores()
    return {"miou": s["Mean IoU"], "confident_pixels": kept / total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--size", type=int, default=128, help="synthetic image side")
    ap.add_argument("--model", default="deeplab-v2")
    ap.add_argument("--model-option", action="append", default=None,
                    help="network config field KEY=VALUE (default for deeplab-v2: the tiny ResNet, BatchNorm trained)")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    options = args.model_option if args.model_option is not None else (
        ["variant=tiny", "aspp_channels=16", "norm_eval=false"] if args.model == "deeplab-v2" else [])

    import torch

    out = Path(args.out)
    data, seeds = out / "data", out / "seeds"
    timings: dict[str, float] = {}
    tic = time.time()
    if not (data / "labels.json").is_file():
        _cli("synth", "export", "--out", str(data), "--n", str(args.n_train), "--val", str(args.n_val), "--test",
             str(args.n_test), "--size", str(args.size), "--quiet")
    timings["export_s"] = time.time() - tic
    tic = time.time()
    _cli("label", str(data / "JPEGImages"), "--labels", str(data / "labels.json"), "--classes", "synth",
         "--refine", "crf", "--confidence", "0.95", "--save-arrays", "--out", str(seeds), "--device", args.device,
         "--quiet", *(["--resume"] if (seeds / "manifest.jsonl").is_file() else []))
    timings["label_s"] = time.time() - tic
    classes = json.loads((seeds / "run.json").read_text())["classes"]
    num_classes = len(classes) + 1

    # the student sees only the train split's pseudo-masks
    from tag2mask.data.segmentation import SegmentationSource, open_segmentation_data
    from tag2mask.engine.loop import RunOptions, train
    from tag2mask.segmenter.evaluation import evaluate_source
    from tag2mask.methods.registry import segmenter_preset
    from tag2mask.segmenter.task import SegmenterTask

    pseudo = open_segmentation_data(data / "JPEGImages", None, seeds, num_classes)
    train_pairs = SegmentationSource([it for it in pseudo.items if it.name.startswith("train_")], num_classes,
                                     "synth train with CLIP-ES pseudo-masks")
    gt = {split: open_segmentation_data(data, split, None, num_classes) for split in ("train", "val", "test")}
    from tag2mask.cmdline.segmenter_options import parse_model_option

    model_options = dict(parse_model_option(o) for o in options)
    config = segmenter_preset(
        None, model=args.model, model_options=model_options, classes=tuple(classes), crop_size=args.crop,
        scale_range=(0.75, 1.5), photometric=False, batch_size=args.batch_size, max_iters=args.iters,
        optimizer=args.optimizer, lr=args.lr, weight_decay=1e-4, head_lr_mult=1.0, head_bias_lr_mult=1.0,
        head_bias_weight_decay=True, poly_power=0.9, lr_step=1,
    )
    students = {}
    for kind, pairs in (("pseudo", train_pairs), ("gt", gt["train"])):
        task = SegmenterTask(config, pairs, None, evaluate_at_end=False)
        tic = time.time()
        summary = train(task, RunOptions(out_dir=str(out / f"student_{kind}"), device=args.device, seed=1,
                                         ckpt_every=args.iters, log_every=50, progress=False, resume="auto"))
        timings[f"train_{kind}_s"] = time.time() - tic
        students[kind] = (task.model, summary.get("last", {}).get("sec_per_it"))
    rows = []
    for split in ("train", "val", "test"):
        p = _score_pseudo(data, seeds, split, num_classes)
        row = {"split": split, "images": len(gt[split]), "pseudo_miou": p["miou"], "confident_pixels": p["confident_pixels"]}
        for kind, (model, _) in students.items():
            row[f"student_{kind}_miou"] = evaluate_source(model, gt[split], config)["scores"]["Mean IoU"]
        rows.append(row)
    model = students["pseudo"][0]
    result = {"rows": rows, "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "sec_per_it": students["pseudo"][1], "model": args.model, "model_options": model_options,
              "iterations": args.iters, "parameters": sum(p.numel() for p in model.parameters()),
              "torch": torch.__version__, "device": args.device}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    start = "frozen pretrained CLIP, decoder from scratch" if args.model == "clip-decoder" else "from scratch"
    print(f"students: {args.model} {model_options} ({result['parameters']:,} parameters, {start}), {args.iters} "
          f"iterations of batch {args.batch_size} at {args.crop} px; training {timings['train_pseudo_s'] / 60:.1f} min "
          f"(pseudo) / {timings['train_gt_s'] / 60:.1f} min (GT) on {args.device}; labelling {timings['label_s'] / 60:.1f} min")
    print("| split | images | CLIP-ES pseudo-labels (CRF, no ignore) | confident pixels | student on pseudo-labels | "
          "same student on ground truth |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['split']} | {r['images']} | {100 * r['pseudo_miou']:.1f} | {100 * r['confident_pixels']:.0f} % | "
              f"{100 * r['student_pseudo_miou']:.1f} | {100 * r['student_gt_miou']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
