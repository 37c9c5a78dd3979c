"""TagCLIP on the synthetic world with the shipped tiny CLIP: tags, and masks without tags.

    PYTHONPATH=. python benchmarks/tagclip_synth.py --n 100 --out /tmp/tagclip_bench

Rows: multi-label classification (mAP, official mAP, official overall F1) of ``tag2mask tag`` (default
and ``--compat``) against the model's plain zero-shot classification (CLS token, same texts, same θ
rule); mIoU of ``tag2mask label --method tagclip`` (no tags: TagCLIP then CLIP-ES) against ``label`` with the
ground-truth tags and ``segment`` (SCLIP, class names only). Wall time per image on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _run(*argv: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tag2mask", *argv, "--quiet"], check=True)
    return time.perf_counter() - t


def _miou(pred: Path, gt: Path) -> float:
    subprocess.run([sys.executable, "-m", "tag2mask", "eval", str(pred), "--gt", str(gt), "--classes", "synth",
                    "--quiet"], check=True, capture_output=True)
    return float(json.loads((pred / "eval.json").read_text())["scores"]["Mean IoU"])


def _zero_shot(images: Path, labels: dict, theta: float) -> dict:
    """Plain CLIP zero-shot: the CLS embedding of the 224x224-resized image, softmax over the same texts."""
    import torch
    from PIL import Image

    from tag2mask.cmdline.options import shipped_weights_path
    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
    from tag2mask.data.transforms import resize_pil, to_normalized_tensor
    from tag2mask.methods.tagclip.metrics import classification_metrics
    from tag2mask.methods.tagclip.presets import preset_for
    from tag2mask.methods.tagclip.tagger import text_matrix

    cfg = preset_for("synth")
    model = load_clip(shipped_weights_path())
    text = text_matrix(model, cfg.texts, cfg.templates)
    names = sorted(labels)
    scores, gt = [], np.zeros((len(names), cfg.num_classes), np.uint8)
    with torch.no_grad():
        for i, name in enumerate(names):
            x = to_normalized_tensor(resize_pil(Image.open(images / name).convert("RGB"), 224, 224), CLIP_MEAN, CLIP_STD)
            f = model.encode_image(x)
            p = (100 * torch.nn.functional.normalize(f, dim=-1) @ text.t()).softmax(-1)[0, : cfg.num_classes]
            scores.append(p.numpy())
            for c in labels[name]:
                gt[i, cfg.class_names.index(c)] = 1
    return classification_metrics(np.stack(scores), gt, theta, cfg.class_names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="synth val images")
    ap.add_argument("--out", default="/tmp/tagclip_bench")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    root = out / "synth"
    subprocess.run([sys.executable, "-m", "tag2mask", "synth", "export", "--out", str(root), "--n", "0", "--val",
                    str(args.n), "--quiet"], check=True)
    images, gt_masks = root / "JPEGImages", root / "SegmentationClass"
    labels = json.loads((root / "labels.json").read_text())
    n = len(labels)
    rows = []
    for name, extra in (("tag (corrected default)", []), ("tag --compat (official bugs)", ["--compat"])):
        d = out / name.split()[0] / ("compat" if extra else "default")
        sec = _run("tag", str(images), "--classes", "synth", "--gt", str(root / "labels.json"), "--device", "cpu",
                   "--out", str(d), *extra)
        m = json.loads((d / "metrics.json").read_text())
        rows.append((name, m, 1000 * sec / n))
    zs = _zero_shot(images, labels, 0.5)
    print(f"# {n} synth val images, {platform.node()}, torch threads 1, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| classifier | mAP | official mAP | official overall F1 (P / R) | ms / image (incl. start-up) |")
    print("|---|---:|---:|---:|---:|")
    for name, m, ms in rows + [("plain zero-shot CLS (same texts, θ 0.5)", zs, float("nan"))]:
        f = m["F1_overall_official"]
        print(f"| {name} | {100 * m['mAP']:.1f} | {100 * m['mAP_official']:.1f} | {100 * (f['f1'] or 0):.1f} "
              f"({100 * (f['p'] or 0):.1f} / {100 * (f['r'] or 0):.1f}) | {ms:.0f} |")
    seg = []
    d = out / "label_auto"
    sec = _run("label", str(images), "--method", "tagclip", "--classes", "synth", "--refine", "none", "--device", "cpu",
               "--out", str(d))
    seg.append(("label --method tagclip (no tags: TagCLIP → CLIP-ES, no refinement)", _miou(d / "masks", gt_masks),
                sec))
    d = out / "label_gt"
    sec = _run("label", str(images), "--labels", str(root / "labels.json"), "--classes", "synth", "--refine", "none",
               "--device", "cpu", "--out", str(d))
    seg.append(("label with ground-truth tags (CLIP-ES, no refinement)", _miou(d / "masks", gt_masks), sec))
    d = out / "segment_sclip"
    sec = _run("segment", str(images), "--classes", "synth", "--method", "sclip", "--device", "cpu", "--out", str(d))
    seg.append(("segment --method sclip (class names only)", _miou(d / "masks", gt_masks), sec))
    print("\n| pipeline | mIoU (%) | ms / image (incl. start-up) |\n|---|---:|---:|")
    for name, miou, sec in seg:
        print(f"| {name} | {100 * miou:.1f} | {1000 * sec / n:.0f} |")


if __name__ == "__main__":
    main()
