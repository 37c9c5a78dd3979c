"""Does MaskCLIP+ beat MaskCLIP, its teacher? (synthetic world, shipped tiny CLIP, CPU-sized)

Pipeline, all with tag2mask's own parts and the same CLIP weights for teacher and baseline:

1. ``tag2mask synth export``: train / val / test splits in VOC layout;
2. **MaskCLIP** (the teacher, as a method on its own): the open-vocabulary segmenter with the
   teacher's settings (``default`` preset, "a photo of a {}.", whole image, the 12 object names and
   the 6 stuff textures as background words) on val and test;
3. **MaskCLIP+ annotation-free**: the train split's *images only* (no masks, no tags); in every
   augmented crop the frozen MaskCLIP labels every pixel and the student trains on those labels
   (``maskclip_plus_config("annotation-free")``: text-embedding classifier, learned background);
   students: ``clip-decoder`` (the frozen tiny CLIP + WeCLIP's decoder, the closest we have to a
   pretrained student) and DeepLab-v2 over the tiny ResNet **from scratch** (no ImageNet weights can
   be downloaded here; the paper's students start from ImageNet);
4. reference: the same students with the same budget on the train split's ground truth (what the
   student could learn from perfect labels);
5. diagnostics: the teacher's labels on the training crops scored against the ground truth of the
   same crops (what the student was really taught), per class; ``--teacher-ablation`` scores them
   as the augmentation is added step by step (whole image, crop, scale + flip, photometric
   distortion); ``--no-photometric`` trains without the distortion (the official pipeline feeds
   the teacher the student's distorted crop).

    PYTHONPATH=. python benchmarks/maskclip_plus_synth.py --out /tmp/mcpbench            # ~35 min on 2 busy cores
    PYTHONPATH=. python benchmarks/maskclip_plus_synth.py --out /tmp/mcpbench --students clip-decoder deeplab-v2 \
        --size 224 --crop 160 --iters 2000 --device cuda                                    # a GPU run

    PYTHONPATH=. python benchmarks/maskclip_plus_synth.py --out /tmp/mcpbench --teacher-ablation     # ~3 min
    PYTHONPATH=. python benchmarks/maskclip_plus_synth.py --out /tmp/mcpbench_np --no-photometric --no-gt-reference

The scratch DeepLab-v2 student costs ~10 s/iteration at crop 160 on 2 busy cores, so the default
runs the clip-decoder student only.

Prints markdown tables and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

SYNTH_TEMPLATES = ["a photo of a {}."]
TEACHER = {"preset": "default", "templates": SYNTH_TEMPLATES}


def _cli(*argv: str) -> None:
    from tag2mask.cli.main import main

    rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): tag2mask {' '.join(argv)}")


def _maskclip_scores(clip, source, num_classes: int) -> dict:
    """MaskCLIP (the teacher's settings) on whole images of ``source``."""
    from PIL import Image

    from tag2mask.evaluation.miou import ConfusionMatrix
    from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
    from tag2mask.vocab.vocabulary import get_vocabulary

    seg = OpenVocabSegmenter(clip, get_vocabulary("synth"), "maskclip", preset=TEACHER["preset"],
                             templates=SYNTH_TEMPLATES, short_side=None, mode="whole", text_cache=False)
    cm = ConfusionMatrix(num_classes)
    for i in range(len(source)):
        _, rgb, gt = source.load(i)
        cm.update(seg.predict(Image.fromarray(rgb)).label, gt)
    return cm.scores()


def _student_config(kind: str, args, vocab, clip):
    from tag2mask.methods.maskclip_plus.recipe import maskclip_plus_config

    common = dict(max_iters=args.iters, batch_size=args.batch_size, crop_size=args.crop, scale_range=(0.75, 1.25),
                  reference_size=None, test_reference_size=None, teacher=TEACHER,
                  clip_fingerprint=getattr(clip, "fingerprint", None))
    if args.no_photometric:  # the teacher (and the student) see undistorted crops
        common["photometric"] = False
    if kind == "clip-decoder":  # WeCLIP's decoder optimiser (AdamW 2e-3, wd 0.01), not the DeepLab SGD recipe
        return maskclip_plus_config("annotation-free", vocab, model="clip-decoder", optimizer="adamw", lr=2e-3,
                                    weight_decay=0.01, min_lr=0.0, **common)
    return maskclip_plus_config("annotation-free", vocab, model_options={"variant": "tiny"}, **common)


def _teacher_on_crops(mcp, config, model, gt_source, n_crops: int, num_classes: int, seed: int,
                      augment=None) -> dict:
    """The teacher's labels on training crops against the ground truth of the same crops."""
    from tag2mask.evaluation.miou import ConfusionMatrix
    from tag2mask.segmenter.task import UNLABELED, SegmentationCrops

    ctx = type("Ctx", (), {"device": torch.device("cpu")})()
    teacher = mcp.teacher(config, ctx, model)
    crops = SegmentationCrops(gt_source, augment or config.augment(), model.normalization, seed)
    cm = ConfusionMatrix(num_classes)
    for pos in range(n_crops):
        image, gt = crops[pos]
        labels = teacher(image[None], torch.full_like(gt, UNLABELED)[None], 0)[0]
        keep = gt != 255
        cm.update(labels[keep].numpy().astype(np.uint8)[None], gt[keep].numpy().astype(np.uint8)[None])
    return cm.scores()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--size", type=int, default=160, help="synthetic image side")
    ap.add_argument("--students", nargs="+", default=["clip-decoder"], choices=["clip-decoder", "deeplab-v2"])
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--no-gt-reference", action="store_true", help="skip the students trained on ground truth")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-photometric", action="store_true",
                    help="train without the recipe's photometric distortion (the teacher labels undistorted crops)")
    ap.add_argument("--teacher-ablation", action="store_true",
                    help="only: the teacher's label quality on train as the augmentation is added step by step")
    args = ap.parse_args()

    from tag2mask.cmdline.options import shipped_weights_path
    from tag2mask.clip.loading import load_clip
    from tag2mask.data.segmentation import open_segmentation_data, open_unlabeled_images
    from tag2mask.methods.maskclip_plus.recipe import MaskClipPlus
    from tag2mask.engine.loop import RunOptions, train
    from tag2mask.segmenter.evaluation import evaluate_source
    from tag2mask.segmenter.task import SegmenterTask
    from tag2mask.vocab.vocabulary import get_vocabulary

    out = Path(args.out)
    data = out / "data"
    if not (data / "labels.json").is_file():
        _cli("synth", "export", "--out", str(data), "--n", str(args.n_train), "--val", str(args.n_val), "--test",
             str(args.n_test), "--size", str(args.size), "--quiet")
    clip = load_clip(shipped_weights_path(), device=args.device)
    vocab = get_vocabulary("synth")
    num_classes = len(vocab) + 1
    gt = {split: open_segmentation_data(data, split, None, num_classes) for split in ("train", "val", "test")}
    images_only = open_unlabeled_images(data, "train")

    if args.teacher_ablation:
        return _teacher_ablation(args, clip, vocab, gt["train"], num_classes, out)
    result: dict = {"splits": {s: len(v) for s, v in gt.items()}, "students": {}, "torch": torch.__version__,
                    "device": args.device, "iterations": args.iters, "photometric": not args.no_photometric,
                    "batch_size": args.batch_size, "crop": args.crop,
                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": os.getloadavg()[0],
                    "threads": torch.get_num_threads()}
    tic = time.time()
    result["maskclip"] = {s: _maskclip_scores(clip, gt[s], num_classes) for s in ("train", "val", "test")}
    result["maskclip_s"] = time.time() - tic

    for kind in args.students:
        mcp = MaskClipPlus(clip, text_cache=False)
        config = _student_config(kind, args, vocab, clip)
        row: dict = {}
        for label, source, factories in (
            ("maskclip+", images_only, {"teacher_factory": mcp.teacher}),
            ("gt", gt["train"], {}),
        ):
            if label == "gt" and args.no_gt_reference:
                continue
            # on ground truth nothing is left to a teacher: every class is read from the masks
            run_config = config if label == "maskclip+" else dataclasses.replace(config, unlabeled_classes=())
            task = SegmenterTask(run_config, source, None, model_factory=mcp.network, evaluate_at_end=False,
                                 **factories)
            run_dir = out / f"{kind}_{label}"
            train(task, RunOptions(out_dir=str(run_dir), device=args.device, seed=1,
                                   ckpt_every=args.iters, log_every=50, progress=False, resume="auto"))
            seconds = _training_seconds(run_dir)
            scores = {s: evaluate_source(task.model, gt[s], config)["scores"] for s in ("train", "val", "test")}
            row[label] = {"scores": scores, "train_s": seconds, "sec_per_it": seconds / args.iters,
                          "parameters": sum(p.numel() for p in task.model.parameters() if p.requires_grad)}
            if label == "maskclip+":
                row["teacher_on_crops"] = _teacher_on_crops(mcp, task.config, task.model, gt["train"], 200,
                                                            num_classes, seed=1)
        result["students"][kind] = row
    result["load_after"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps(result, indent=1))
    _print(result, vocab)
    return 0


def _training_seconds(run_dir: Path) -> float:
    """Wall time of the run's training sessions (start -> stop events of its log; a resumed run adds up)."""
    total, start = 0.0, None
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "start":
            start = event["time"]
        elif event.get("event") == "stop" and start is not None:
            total, start = total + event["time"] - start, None
    return total


def _teacher_ablation(args, clip, vocab, train_gt, num_classes: int, out: Path) -> int:
    """Where the teacher loses quality between whole images and the training crops (train split, ground truth)."""
    from tag2mask.data.seg_augment import SegAugment
    from tag2mask.methods.maskclip_plus.recipe import MaskClipPlus

    mcp = MaskClipPlus(clip, text_cache=False)
    config = _student_config("clip-decoder", args, vocab, clip)
    model = mcp.network(config)
    n = len(train_gt)
    steps = [
        ("whole image, no augmentation", SegAugment(crop=args.size, scale_range=(1.0, 1.0), hflip=False), n),
        (f"{args.crop} px crop at scale 1", SegAugment(crop=args.crop, scale_range=(1.0, 1.0), hflip=False), 2 * n),
        ("+ scale 0.75-1.25 and flip", SegAugment(crop=args.crop, scale_range=(0.75, 1.25), hflip=True), 2 * n),
        ("+ photometric distortion (the training crops)", config.augment(), 2 * n),
    ]
    rows = []
    for label, augment, count in steps:
        s = _teacher_on_crops(mcp, config, model, train_gt, count, num_classes, seed=1, augment=augment)
        rows.append({"step": label, "miou": s["Mean IoU"], "pixel_acc": s["Pixel Accuracy"], "class_iou": s["Class IoU"]})
    (out / "teacher_ablation.json").write_text(json.dumps(rows, indent=1))
    print("| teacher input (train split) | mIoU | pixel accuracy |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {_pct(r['miou'])} | {_pct(r['pixel_acc'])} |")
    return 0


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _print(result: dict, vocab) -> None:
    names = ["background", *vocab.names]
    print(f"synth {result['splits']}, {result['iterations']} iterations of batch {result['batch_size']} at "
          f"{result['crop']} px, device {result['device']}, torch {result['torch']}, {result['threads']} threads, "
          f"{result['started']}, load {result['load_before']:.1f} -> {result['load_after']:.1f}; MaskCLIP scoring "
          f"{result['maskclip_s']:.0f} s")
    head = "| split | MaskCLIP (teacher) |"
    sep = "|---|---:|"
    for kind, row in result["students"].items():
        head += f" MaskCLIP+ {kind} |" + (f" {kind} on ground truth |" if "gt" in row else "")
        sep += "---:|" + ("---:|" if "gt" in row else "")
    print(head)
    print(sep)
    for split in ("train", "val", "test"):
        line = f"| {split} | {_pct(result['maskclip'][split]['Mean IoU'])} |"
        for row in result["students"].values():
            line += f" {_pct(row['maskclip+']['scores'][split]['Mean IoU'])} |"
            if "gt" in row:
                line += f" {_pct(row['gt']['scores'][split]['Mean IoU'])} |"
        print(line)
    for kind, row in result["students"].items():
        t = row["maskclip+"]
        print(f"\n{kind}: {t['parameters']:,} trainable parameters, MaskCLIP+ training {t['train_s'] / 60:.1f} min "
              f"({t['sec_per_it']:.1f} s/it); teacher on its training crops: mIoU "
              f"{_pct(row['teacher_on_crops']['Mean IoU'])} (pixel acc {_pct(row['teacher_on_crops']['Pixel Accuracy'])})")
        print("| class | MaskCLIP val | teacher on train crops | MaskCLIP+ val |" + (" GT-trained val |" if "gt" in row else ""))
        print("|---|---:|---:|---:|" + ("---:|" if "gt" in row else ""))
        for c, name in enumerate(names):
            line = (f"| {name} | {_pct(result['maskclip']['val']['Class IoU'][c])} | "
                    f"{_pct(row['teacher_on_crops']['Class IoU'][c])} | {_pct(t['scores']['val']['Class IoU'][c])} |")
            if "gt" in row:
                line += f" {_pct(row['gt']['scores']['val']['Class IoU'][c])} |"
            print(line)


if __name__ == "__main__":
    sys.exit(main())
