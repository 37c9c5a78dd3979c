"""Mask quality of every training-free method on the synthetic world (synth val), with the shipped tiny CLIP.

    python benchmarks/synth_quality.py --n 200

Prints the zero-shot multi-label classification mAP of the model and an mIoU table (13 classes:
background + 12 objects; CLIP-ES methods use the scenes' image-level labels, the open-vocabulary
methods only the class names with the stuff textures as background words).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from tag2mask.cmdline.options import shipped_weights_path
from tag2mask.clip.loading import load_clip
from tag2mask.cli.demo_scenes import evaluate_methods, results_table

METHODS = ("gradcam", "clip-es", "clip-es+pamr", "clip-es+crf", "maskclip", "sclip", "clearclip", "naclip")
LABELS = {
    "gradcam": "softmax-GradCAM (no CAA)",
    "clip-es": "GradCAM + CAA (CLIP-ES seeds)",
    "clip-es+pamr": "GradCAM + CAA + PAMR",
    "clip-es+crf": "GradCAM + CAA + dense CRF",
    "weclip": "WeCLIP (decoder trained on synth train, image only)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"], help="synth split to score (default val)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--weclip-checkpoint", default=None, help="add WeCLIP trained on synth train (tag2mask train weclip --data synth)")
    args = ap.parse_args()
    model = load_clip(args.weights or shipped_weights_path(), device=args.device)
    from tag2mask.tiny_clip.evaluation import zero_shot_map

    t0 = time.time()
    zs = zero_shot_map(model, n_val=args.n)  # always on val
    import importlib.util

    with_crf = "clip-es+crf" in args.methods and importlib.util.find_spec("pydensecrf") is not None
    methods = [m for m in args.methods if m != "clip-es+crf" or with_crf]
    if args.weclip_checkpoint and "weclip" not in methods:
        methods.append("weclip")
    scores = evaluate_methods(model, args.n, methods, split=args.split, with_crf=with_crf,
                              weclip_checkpoint=args.weclip_checkpoint)
    for s in scores.values():
        s.name = LABELS.get(s.name, s.name)
    print(
        f"synth {args.split}, {args.n} images, weights {args.weights or 'shipped tiny CLIP'}, device {args.device} "
        f"({platform.machine()}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s"
    )
    print(f"zero-shot multi-label mAP (val): {zs:.3f}")
    print(results_table(scores, args.n))


if __name__ == "__main__":
    main()
