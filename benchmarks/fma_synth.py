"""FMA-WSSS on the synthetic world: does prompt training lower its losses, and do its seeds beat CLIP-ES?

The whole two-stage recipe with tag2mask's own commands and the shipped tiny CLIP, CPU-sized:

1. ``tag2mask synth export``: train / val / test splits in VOC layout (exact masks, image-level tags);
2. ``tag2mask train fma --task cls`` on train (multi-label contrastive loss, the ``synth`` preset);
3. ``tag2mask label --method fma --prompts CLS --proposals slic`` on train: the coarse seeds;
4. ``tag2mask train fma --task seg --seeds COARSE`` on train (CAM activation loss);
5. on val and test, every row from the same images and tags: CLIP-ES (``label --refine none``:
   GradCAM + CAA, background ``(1 - max)^1``), CLIP-ES's CAMs through the same superpixel seeding
   (``tag2mask seed``), and FMA's CAMs of both stages without proposals and with SLIC proposals.

The loss curves are read from the runs' ``train_log.csv`` (means over 10 iterations of random crops,
noisy); the losses are also measured on fixed whole training images with the initial and the learned
contexts; every mask folder is scored against the
ground truth with the CLIP-ES rule (classes present in the ground truth or the prediction).

    PYTHONPATH=. python benchmarks/fma_synth.py --out /tmp/fmabench        # ~20 min on 2 busy CPU cores

Prints markdown tables and writes OUT/results.json. Re-running with the same OUT reuses what is done.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np


def _cli(*argv: str) -> None:
    from tag2mask.cli.main import main

    rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): tag2mask {' '.join(argv)}")


def _done(run: Path) -> bool:
    return (run / "run.json").is_file() or (run / "prompts.safetensors").is_file()


def _miou(data: Path, masks: Path, split: str, num_classes: int) -> float:
    from tag2mask.evaluation.miou import ConfusionMatrix
    from tag2mask.io.palette import read_label_png

    cm = ConfusionMatrix(num_classes)
    for name in (data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
        gt = read_label_png(data / "SegmentationClass" / f"{name}.png")
        cm.update(read_label_png(masks / f"{name}.png").astype(np.uint8), gt, name)
    return float(cm.scores()["Mean IoU"])


def _curve(run: Path, columns: tuple[str, ...], points: int) -> list[dict[str, float]]:
    """``points`` rows of the run's train_log.csv, evenly spaced from the first to the last."""
    with open(run / "train_log.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(columns[0]) not in (None, "")]
    picks = sorted({round(i * (len(rows) - 1) / (points - 1)) for i in range(points)}) if rows else []
    return [{"iteration": int(float(rows[i]["iteration"])), **{c: float(rows[i][c]) for c in columns if rows[i].get(c)}}
            for i in picks]


def _sec_per_it(run: Path) -> float:
    """Median seconds per iteration of the run's logged windows."""
    with open(run / "train_log.csv", newline="") as f:
        values = [float(r["sec_per_it"]) for r in csv.DictReader(f) if r.get("sec_per_it")]
    return float(np.median(values)) if values else float("nan")


def _fixed_losses(run: Path, data: Path, split: str, seeds: Optional[Path], initial: bool, limit: int,
                  batch: int = 8) -> dict[str, float]:
    """The stage's losses on the whole images of ``split`` (no augmentation: the same pixels for every
    context), with the run's learned context or its initial one (the preset's seed); the first ``limit``."""
    import torch

    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
    from tag2mask.methods.fma.data import open_fma_data
    from tag2mask.methods.fma.train_task import _LossForward
    from tag2mask.methods.fma.prompt_run import build_model, load_prompts

    config, ctx, meta = load_prompts(run)
    model = build_model(config, load_clip(meta["clip"]["weights"]), None if initial else ctx)
    forward = _LossForward(model, config.stage.loss_weights)
    source = open_fma_data(str(data), split, config.class_names, seeds=seeds, label_source="dataset")
    sums: dict[str, float] = {}
    n = min(limit, len(source))
    for start in range(0, n, batch):
        loaded = [source.load(i) for i in range(start, min(start + batch, n))]
        images = torch.stack([(torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None])
                              / torch.tensor(CLIP_STD)[:, None, None] for _, rgb, _, _ in loaded])
        labels = torch.zeros(len(loaded), config.num_fg, dtype=torch.long)
        for row, (_, _, ids, _) in enumerate(loaded):
            labels[row, ids] = 1
        masks = None if seeds is None else torch.stack([torch.from_numpy(m.astype("int64")) for *_, m in loaded])
        values = forward(images, labels, masks)
        for key in ("cl_loss", "cam_fg", "cam_bg", "loss"):
            if key in values:
                sums[key] = sums.get(key, 0.0) + float(values[key].detach()) * len(loaded)
    return {k: v / n for k, v in sums.items()}


def _mean_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Multi-label mAP over the classes with a positive: (N, C) scores, (N, C) 0/1 labels."""
    aps = []
    for c in range(labels.shape[1]):
        if labels[:, c].sum() == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = labels[order, c]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return float(np.mean(aps))


def _classification_maps(run: Path, data: Path, split: str) -> dict[str, float]:
    """Multi-label mAP on ``split`` of the image side FMA uses (mean patch token, learned prompts; also
    with the initial context) and of the tiny CLIP's own zero-shot embeddings ("a photo of a {class}.",
    CLS token and mean patch token): is the CAM target itself weaker with FMA's pieces?"""
    import torch
    import torch.nn.functional as F

    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
    from tag2mask.clip.tokenizer import tokenize
    from tag2mask.tiny_clip.evaluation import image_features
    from tag2mask.methods.fma.data import open_fma_data
    from tag2mask.methods.fma.prompt_run import build_model, load_prompts

    config, ctx, meta = load_prompts(run)
    clip = load_clip(meta["clip"]["weights"])
    source = open_fma_data(str(data), split, config.class_names, label_source="dataset")
    loaded = [source.load(i) for i in range(len(source))]
    x = torch.stack([(torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None])
                     / torch.tensor(CLIP_STD)[:, None, None] for _, rgb, _, _ in loaded])
    labels = np.zeros((len(loaded), config.num_fg), dtype=np.int64)
    for row, (_, _, ids, _) in enumerate(loaded):
        labels[row, ids] = 1
    result = {}
    with torch.no_grad():
        for name, context in (("fma_learned", ctx), ("fma_initial", None)):
            model = build_model(config, clip, context).eval()
            logits = torch.cat([model(x[i:i + 8], torch.from_numpy(labels[i:i + 8]), need_cams=False,
                                      need_attention=False, require_positive=False).logits[:, :config.num_fg]
                                for i in range(0, len(x), 8)])
            result[name] = _mean_ap(logits.float().numpy(), labels)
        text = F.normalize(clip.encode_text(tokenize([f"a photo of a {c}." for c in config.class_names])).float(), dim=-1)
        for pooling in ("cls", "mean"):
            feats = torch.cat([clip.encode_image(x[i:i + 8]) if pooling == "cls" else image_features(clip, x[i:i + 8])["mean"]
                               for i in range(0, len(x), 8)])
            result[f"clip_{pooling}"] = _mean_ap((F.normalize(feats.float(), dim=-1) @ text.T).numpy(), labels)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=80)
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--size", type=int, default=224, help="synthetic image side (the tiny CLIP's scenes: 224)")
    ap.add_argument("--cls-iters", type=int, default=150)
    ap.add_argument("--seg-iters", type=int, default=100)
    ap.add_argument("--warmup-iters", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-segments", type=int, default=100, help="SLIC superpixels per image")
    ap.add_argument("--loss-images", type=int, default=40, help="train images the fixed-image losses are measured on")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    data = out / "data"
    timings: dict[str, float] = {}
    load = {"start": os.getloadavg()[0]}

    def timed(key: str, fn, *a) -> None:
        tic = time.time()
        fn(*a)
        timings[key] = timings.get(key, 0.0) + time.time() - tic

    if not (data / "labels.json").is_file():
        timed("export_s", _cli, "synth", "export", "--out", str(data), "--n", str(args.n_train), "--val",
              str(args.n_val), "--test", str(args.n_test), "--size", str(args.size), "--quiet")
    common = ("--device", args.device, "--quiet")
    slic = ("--proposals", "slic", "--n-segments", str(args.n_segments))

    def train(task: str, iters: int, run: Path, *extra: str) -> None:
        if not _done(run):
            timed(f"train_{task}_s", _cli, "train", "fma", "--task", task, "--data", str(data), "--out", str(run),
                  "--iters", str(iters), "--warmup-iters", str(args.warmup_iters), "--batch-size",
                  str(args.batch_size), "--log-every", "10", "--ckpt-every", str(iters), *extra, *common,
                  *(["--resume"] if (run / "checkpoints").is_dir() else []))

    def label(split: str, run: Path, *extra: str) -> None:
        if not _done(run):
            timed(f"label_{run.name}_s", _cli, "label", str(data), "--split", split, "--out", str(run), *extra,
                  *common, *(["--resume"] if (run / "manifest.jsonl").is_file() else []))

    cls_run, seg_run = out / "prompts_cls", out / "prompts_seg"
    train("cls", args.cls_iters, cls_run)
    coarse = out / "train" / "fma_cls_slic"
    label("train", coarse, "--method", "fma", "--prompts", str(cls_run), *slic)
    train("seg", args.seg_iters, seg_run, "--seeds", str(coarse))

    from tag2mask.methods.fma.prompt_run import load_prompts

    num_classes = len(load_prompts(cls_run)[0].class_names) + 1
    # the prompts as initialised (two steps at the warm-up's 1e-5): what training changes
    init_run = out / "prompts_cls_init"
    if not _done(init_run):
        _cli("train", "fma", "--task", "cls", "--data", str(data), "--out", str(init_run), "--iters", "2",
             "--warmup-iters", "1", "--batch-size", str(args.batch_size), *common)
    rows: dict[str, dict[str, float]] = {"coarse_train": {"train": _miou(data, coarse / "masks", "train", num_classes)}}
    methods = {
        "clip_es": "CLIP-ES seeds (GradCAM + CAA, no refinement)",
        "clip_es_slic": "CLIP-ES CAMs + SLIC seeding (alpha 0.6)",
        "fma_init": "FMA initial cls prompts (2 its at lr 1e-5): CAA CAMs",
        "fma_cls": "FMA cls prompts: CAA CAMs (no proposals)",
        "fma_cls_slic": "FMA cls prompts + SLIC seeding (coarse seeds)",
        "fma_seg": "FMA seg prompts: CAA CAMs (no proposals)",
        "fma_seg_slic": "FMA seg prompts + SLIC seeding (fine seeds)",
    }
    for split in ("val", "test"):
        d = out / split
        label(split, d / "clip_es", "--classes", "synth", "--refine", "none")
        if not _done(d / "clip_es_slic"):
            timed("seed_clip_es_slic_s", _cli, "seed", str(d / "clip_es"), "--images", str(data / "JPEGImages"),
                  "--alpha", "0.6", "--out", str(d / "clip_es_slic"), *slic, "--quiet")
        label(split, d / "fma_init", "--method", "fma", "--prompts", str(init_run))
        label(split, d / "fma_cls", "--method", "fma", "--prompts", str(cls_run))
        label(split, d / "fma_cls_slic", "--method", "fma", "--prompts", str(cls_run), *slic)
        label(split, d / "fma_seg", "--method", "fma", "--prompts", str(seg_run))
        label(split, d / "fma_seg_slic", "--method", "fma", "--prompts", str(seg_run), *slic)
        for key in methods:
            rows.setdefault(key, {})[split] = _miou(data, d / key / "masks", split, num_classes)
    load["end"] = os.getloadavg()[0]

    curves = {"cls": _curve(cls_run, ("cl_loss", "loss"), 6), "seg": _curve(seg_run, ("cam_fg", "cam_bg", "loss"), 6)}
    tic = time.time()
    cache = out / "fixed_losses.json"  # kept, so that a re-run does not measure them again
    fixed = json.loads(cache.read_text()) if cache.is_file() else {}
    for stage, run, seeds in (("cls", cls_run, None), ("seg", seg_run, coarse / "masks")):
        for which in ("initial", "learned"):
            key = f"{stage}_{which}_train"
            if key not in fixed:
                fixed[key] = _fixed_losses(run, data, "train", seeds, which == "initial", args.loss_images)
                cache.write_text(json.dumps(fixed, indent=2))
    timings["fixed_losses_s"] = time.time() - tic
    maps = {split: _classification_maps(cls_run, data, split) for split in ("val", "test")}
    result = {"miou": rows, "curves": curves, "fixed_losses": fixed, "classification_map": maps, "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "load_average": load, "args": vars(args), "torch": torch.__version__, "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps(result, indent=2))

    print(f"synth {args.n_train} train / {args.n_val} val / {args.n_test} test at {args.size} px, {args.device} "
          f"({platform.machine()}), torch {torch.__version__}, {result['date']}, load {load['start']:.1f} -> "
          f"{load['end']:.1f}")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings_s"].items()))
    print("\ncls prompts (multi-label contrastive loss), mean over the last 10 iterations:")
    print("| iteration | cl_loss |\n|---:|---:|")
    for r in curves["cls"]:
        print(f"| {r['iteration']} | {r.get('cl_loss', r['loss']):.4f} |")
    print("\nseg prompts (CAM activation loss against the coarse seeds):")
    print("| iteration | cam_fg | cam_bg | loss |\n|---:|---:|---:|---:|")
    for r in curves["seg"]:
        print(f"| {r['iteration']} | {r.get('cam_fg', float('nan')):.3e} | {r.get('cam_bg', float('nan')):.3e} | "
              f"{r['loss']:.3e} |")
    print(f"\nlosses on the first {args.loss_images} whole train images (no augmentation), initial vs learned context:")
    print("| stage | loss | initial context | learned context |\n|---|---|---:|---:|")
    for stage, keys in (("cls", ("cl_loss",)), ("seg", ("cam_fg", "cam_bg", "loss"))):
        for key in keys:
            print(f"| {stage} | {key} | {fixed[f'{stage}_initial_train'][key]:.4g} | "
                  f"{fixed[f'{stage}_learned_train'][key]:.4g} |")
    print("\nmulti-label classification mAP (the GradCAM target's quality):")
    print("| image side, prompts | val | test |\n|---|---:|---:|")
    for key, text in (("fma_initial", "FMA (mean patch token), initial cls context"),
                      ("fma_learned", "FMA (mean patch token), learned cls context"),
                      ("clip_cls", "tiny CLIP zero-shot, CLS token, 'a photo of a {class}.'"),
                      ("clip_mean", "tiny CLIP zero-shot, mean patch token, same prompt")):
        print(f"| {text} | {maps['val'][key]:.3f} | {maps['test'][key]:.3f} |")
    its = {k: _sec_per_it(r) for k, r in (("cls", cls_run), ("seg", seg_run))}
    print(f"\nseconds per iteration (batch {args.batch_size}): cls {its['cls']:.2f}, seg {its['seg']:.2f}")
    print(f"coarse seeds (FMA cls prompts + SLIC) on train, the seg stage's input: "
          f"{100 * rows['coarse_train']['train']:.1f} mIoU")
    print("\n| seeds | mIoU (%) val | mIoU (%) test |\n|---|---:|---:|")
    for key, label_text in methods.items():
        r = rows[key]
        print(f"| {label_text} | {100 * r['val']:.1f} | {100 * r['test']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
