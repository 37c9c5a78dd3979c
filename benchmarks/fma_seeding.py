"""Benchmark FMA-WSSS seeding per image: proposals + seed map, SAM (ViT-B-sized, random weights)
against superpixels, side by side in one run.

Usage::

    python benchmarks/fma_seeding.py                       # 500x375, FMA preset, 4 points per side
    python benchmarks/fma_seeding.py --points-per-side 32  # the official grid (very slow on a CPU)
    python benchmarks/fma_seeding.py --device cuda

The SAM is ``SamModel(SamConfig())`` (transformers' defaults: a ViT-B image encoder, 94 M
parameters) with random weights: speed does not depend on the weights, but what survives the
IoU / stability filters does, so the filters are opened (every mask passes; the post-processing
cost is then an upper bound) unless ``--official-filters``. Per image the generator runs the image
encoder once per crop (1 + 4 crops with the FMA preset) and the mask decoder once per point
(points_per_side^2 on the image + (points_per_side/2)^2 on each crop). The script measures the
encoder time per crop and the decoder time per point and extrapolates the cost of the official
32-point grid from them; the end-to-end time of the reduced grid checks the model.
Prints a markdown table (seconds per image) with the machine load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TimedSam:
    """Wraps a SamModel and adds up the time of its image-encoder and mask-decoder calls."""

    def __init__(self, model):
        self._model = model
        self.encoder_s = 0.0
        self.encoder_calls = 0
        self.decoder_s = 0.0
        self.decoder_points = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def eval(self):
        self._model.eval()
        return self

    def _sync(self):
        if next(self._model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()

    def get_image_embeddings(self, pixel_values):
        self._sync()
        t0 = time.perf_counter()
        out = self._model.get_image_embeddings(pixel_values)
        self._sync()
        self.encoder_s += time.perf_counter() - t0
        self.encoder_calls += 1
        return out

    def __call__(self, **kwargs):
        self._sync()
        t0 = time.perf_counter()
        out = self._model(**kwargs)
        self._sync()
        self.decoder_s += time.perf_counter() - t0
        self.decoder_points += int(kwargs["input_points"].shape[1])
        return out


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """Blocky shapes on a textured background (superpixels and SAM get structure to work with)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 90, (h, w, 3)).astype(np.uint8)
    for _ in range(6):
        y0, x0 = int(rng.integers(0, h - h // 4)), int(rng.integers(0, w - w // 4))
        img[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 255, 3)
    return img


def points_total(per_side: int, crop_layers: int, downscale: int) -> int:
    total = per_side**2
    for layer in range(1, crop_layers + 1):
        total += (4**layer) * int(per_side / downscale**layer) ** 2
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--points-per-side", type=int, default=4)
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=2, help="CAM channels per image")
    ap.add_argument("--official-filters", action="store_true", help="keep the FMA IoU/stability thresholds")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from transformers import SamConfig, SamModel

    from tag2mask.proposals.sam import SAM_PRESETS, SamMaskGenerator
    from tag2mask.proposals.seeding import seed_from_proposals
    from tag2mask.proposals.superpixels import SuperpixelProposals, SuperpixelSettings

    torch.manual_seed(0)
    device = torch.device(args.device)
    sam = TimedSam(SamModel(SamConfig()).to(device).eval())
    n_params = sum(p.numel() for p in sam.parameters()) / 1e6
    settings = replace(SAM_PRESETS["fma"], points_per_side=args.points_per_side, points_per_batch=args.points_per_batch)
    if not args.official_filters:
        settings = replace(settings, pred_iou_thresh=-1e9, stability_score_thresh=0.0)
    generator = SamMaskGenerator(sam, settings)
    sources = {"slic (100)": SuperpixelProposals("slic", SuperpixelSettings(n_segments=100)),
               "felzenszwalb (scale 100)": SuperpixelProposals("felzenszwalb", SuperpixelSettings())}
    rng = np.random.default_rng(1)
    rows: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    load_before = os.getloadavg()
    for i in range(args.images):
        image = synthetic_image(args.height, args.width, i)
        cams = rng.normal(size=(args.classes, args.height // 16, args.width // 16)).astype(np.float32)
        ids = np.arange(args.classes)
        enc0, dec0 = sam.encoder_s, sam.decoder_s
        t0 = time.perf_counter()
        props = generator.generate(image)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        seed_from_proposals(cams, ids, props, 0.6)
        seed_s = time.perf_counter() - t1
        enc, dec = sam.encoder_s - enc0, sam.decoder_s - dec0
        rows.setdefault("SAM: image encoder", []).append(enc)
        rows.setdefault("SAM: mask decoder", []).append(dec)
        rows.setdefault("SAM: upsampling, filters, NMS, clean-up, level filter", []).append(total - enc - dec)
        rows.setdefault("SAM: seed map", []).append(seed_s)
        counts.setdefault("SAM", []).append(len(props))
        for name, source in sources.items():
            t0 = time.perf_counter()
            sp = source(image, str(i))
            prop_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            seed_from_proposals(cams, ids, sp, 0.6)
            rows.setdefault(f"{name}: proposals", []).append(prop_s)
            rows.setdefault(f"{name}: seed map", []).append(time.perf_counter() - t1)
            counts.setdefault(name, []).append(len(sp))
    load_after = os.getloadavg()

    enc_per_crop = sam.encoder_s / max(sam.encoder_calls, 1)
    dec_per_point = sam.decoder_s / max(sam.decoder_points, 1)
    full_points = points_total(32, settings.crop_n_layers, settings.crop_n_points_downscale_factor)
    crops = 1 + sum(4**layer for layer in range(1, settings.crop_n_layers + 1))
    post = float(np.mean(rows["SAM: upsampling, filters, NMS, clean-up, level filter"]))
    extrapolated = crops * enc_per_crop + full_points * dec_per_point + post

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}; load average before/after "
          f"{load_before[0]:.1f}/{load_after[0]:.1f}; date {time.strftime('%Y-%m-%d')}")
    print(f"image {args.height}x{args.width}, {args.images} image(s); SAM ViT-B-sized random ({n_params:.1f} M params), "
          f"FMA preset with {args.points_per_side} points per side "
          f"({'official' if args.official_filters else 'opened'} filters); masks kept: "
          + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in counts.items()))
    print()
    print("| stage | seconds per image |")
    print("|---|---:|")
    for name, values in rows.items():
        print(f"| {name} | {np.mean(values):.3f} |")
    sam_total = sum(np.mean(rows[k]) for k in rows if k.startswith("SAM"))
    print(f"| **SAM total ({args.points_per_side} points per side)** | **{sam_total:.2f}** |")
    print(f"| SAM encoder per crop / decoder per point | {enc_per_crop:.2f} / {dec_per_point:.4f} |")
    print(f"| **SAM extrapolated to the official grid (32 per side: {crops} crops, {full_points} points)** | "
          f"**{extrapolated:.1f}** |")


if __name__ == "__main__":
    main()
