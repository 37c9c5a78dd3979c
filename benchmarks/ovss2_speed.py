"""CPU/GPU time per image of SC-CLIP, PEARL and CorrCLIP next to SCLIP and NACLIP, published settings.

ViT-B/16-sized random CLIP weights (and, for CorrCLIP, a ViT-B/8-sized random DINO); same FLOPs as
the real models, so timings transfer, masks do not. Each method runs its ``published`` preset (short
side 336; SCLIP / NACLIP / SC-CLIP / PEARL windows 224 / 112, CorrCLIP 336 / 112 padded to 56; NACLIP
with its PAMR, PEARL with its TLP) on a 480x640 image (-> 336x448) with 20 classes + 5 background
words. CorrCLIP gets a fixed region map of 24 rectangles (the cost of producing regions is timed
separately: SLIC on the same image). Timings round-robin, best of ``--reps``. Prints a markdown table::

    python benchmarks/ovss2_speed.py [--device cpu|cuda] [--reps 2] [--threads N] [--methods ...] [--no-warmup]

Each row is printed as soon as it is measured; ``x SCLIP`` needs ``sclip`` among ``--methods``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.methods.corrclip import CorrClipSegmenter
from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
from tag2mask.methods.ovss2 import NewerOvssSegmenter
from tag2mask.models.dino import DinoViT
from tag2mask.vocab.vocabulary import Vocabulary

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
           "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor"]
BACKGROUND = ["sky", "wall", "tree", "grass", "road"]


def _ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=None, help="subset of the rows (default: all)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of each method")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(embed_dim=512, vision=VisionConfig(768, 12, 12, 224, 16), text=TextConfig(512, 12, 8)))
    model = model.to(device).eval()
    dino = DinoViT(embed_dim=768, depth=12, num_heads=12, patch_size=8).to(device).eval()
    for p in dino.parameters():
        torch.nn.init.normal_(p, std=0.02)
    vocab = Vocabulary.from_names(CLASSES, background=BACKGROUND)
    rgb = np.random.RandomState(0).randint(0, 256, (480, 640, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    regions = (np.arange(480)[:, None] // 120) * 6 + np.arange(640)[None, :] // 107  # 4 x 6 rectangles
    common = dict(preset="published", templates="photo", text_cache=False, device=device)
    segs = {
        "sclip": OpenVocabSegmenter(model, vocab, "sclip", **common),
        "naclip (+PAMR)": OpenVocabSegmenter(model, vocab, "naclip", **common),
        "scclip": NewerOvssSegmenter(model, vocab, "scclip", **common),
        "pearl (+TLP)": NewerOvssSegmenter(model, vocab, "pearl", **common),
        "corrclip": CorrClipSegmenter(model, vocab, dino, **common),
    }
    jobs = {name: (lambda s=s: s.predict(image, region_map=regions)) if isinstance(s, CorrClipSegmenter)
            else (lambda s=s: s.predict(image)) for name, s in segs.items()}
    try:
        from tag2mask.proposals.superpixels import SuperpixelProposals

        slic = SuperpixelProposals("slic")
        jobs["slic regions (CPU)"] = lambda: slic.segment(rgb)
    except ImportError:
        pass
    if args.methods:
        jobs = {k: v for k, v in jobs.items() if k.split(" ")[0] in args.methods}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"published presets, ViT-B/16-sized random CLIP (+ ViT-B/8 DINO for corrclip), 480x640 -> 336x448, "
          f"20 classes + 5 background words, {name}, torch {torch.__version__}, best of {args.reps}\n")
    print("| method | ms/image | x SCLIP |")
    print("|---|---:|---:|", flush=True)
    best: dict[str, float] = {}
    with torch.no_grad():
        for k, fn in jobs.items():  # one method at a time, so each row appears as soon as it is measured
            if not args.no_warmup:
                fn()
            best[k] = min(_ms(fn, device) for _ in range(args.reps))
            ratio = f"{best[k] / best['sclip']:.2f}" if "sclip" in best else "–"
            print(f"| {k} | {best[k]:.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
