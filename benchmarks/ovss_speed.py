"""Speed of the training-free OVSS methods with ViT-B/16-sized random weights.

For each method (MaskCLIP, SCLIP, ClearCLIP, NACLIP and the unchanged CLIP block) this measures:

* ms/image of :meth:`OpenVocabSegmenter.predict` at short side 448, whole image and sliding window
  (crop 224, stride 112), on a 480×640 input (resized to 448×597) with 20 classes + 5 background words;
* the dense head's cost: ``dense_logits`` (image tower with the method's last block, ``ln_post`` and
  ``proj`` on every token, cosine logits) against a plain CLIP image forward (``model.visual``) on the
  same 448×597 network input, and the relative overhead (target: ≤ 10 %).

Random weights give the same FLOPs as the real ViT-B/16, so timings transfer; the masks do not.
Prints a markdown table. Usage::

    python benchmarks/ovss_speed.py [--device cpu|cuda] [--reps 3] [--threads N] [--methods ...]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image

from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
from tag2mask.vocab.vocabulary import Vocabulary

METHODS = ("clip", "maskclip", "sclip", "clearclip", "naclip")
CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
           "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor"]
BACKGROUND = ["sky", "wall", "tree", "grass", "road"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(embed_dim=512, vision=VisionConfig(768, 12, 12, 224, 16), text=TextConfig(512, 12, 8)))
    model = model.to(device).eval()
    vocab = Vocabulary.from_names(CLASSES, background=BACKGROUND)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (480, 640, 3), dtype=np.uint8))

    # every (method, mode) segmenter is built first and all timings are taken round-robin, so that
    # machine load drifting during the run affects every method alike
    segs = {(m, mode): OpenVocabSegmenter(model, vocab, m, mode=mode, short_side=448, crop=224, stride=112,
                                          templates="photo", prob_threshold=0.1, text_cache=False)
            for m in args.methods for mode in ("whole", "slide")}
    x = segs[(args.methods[0], "whole")]._preprocess(image)  # (1, 3, 448, 597): the whole-mode network input
    jobs: dict[tuple[str, str], Callable[[], object]] = {}
    for m in args.methods:  # dense and plain back to back, so each pair sees the same load
        jobs[(m, "whole")] = lambda s=segs[(m, "whole")]: s.predict(image)
        jobs[(m, "slide")] = lambda s=segs[(m, "slide")]: s.predict(image)
        jobs[(m, "dense")] = lambda s=segs[(m, "whole")]: s.dense_logits(x)
        jobs[(m, "plain")] = lambda: model.visual(x)
    best = {key: float("inf") for key in jobs}
    with torch.no_grad():
        for fn in jobs.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for key, fn in jobs.items():
                best[key] = min(best[key], _once_ms(fn, device))
    rows = []
    for m in args.methods:
        row = {"method": m, **{k: best[(m, k)] for k in ("whole", "slide", "dense", "plain")}}
        row["overhead"] = 100.0 * (row["dense"] - row["plain"]) / row["plain"]
        rows.append(row)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ViT-B/16-sized random weights, input 480x640 -> short side 448 (448x597), 20 classes + 5 background words, "
          f"{name}, torch {torch.__version__}, best of {args.reps}\n")
    print("| method | whole ms/img | slide ms/img (224/112) | dense head ms | plain CLIP forward ms | head overhead |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['whole']:.1f} | {r['slide']:.1f} | {r['dense']:.1f} | {r['plain']:.1f} | "
              f"{r['overhead']:+.1f} % |")


if __name__ == "__main__":
    main()
