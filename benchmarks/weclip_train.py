"""WeCLIP training speed and peak memory with a ViT-B/16-sized CLIP (random weights, same compute).

One iteration = the full official step: frozen CLIP blocks 1-11 on the batch, decoder forward,
per-image softmax-GradCAM (own classes + 25 background words) + CAA or RFM + boxes + PAR at crop
size, balanced CE + 0.1 x affinity loss, backward, PolyWarmupAdamW step. VOC preset: crop 320,
batch 4, 21 classes; each image gets 2 random labels (VOC train_aug averages ~1.5 classes/image).

Reference (paper Table 3, RTX 3090): 0.54 s/iteration (30k iterations in 4.5 h), 6.2 GB peak.

    python benchmarks/weclip_train.py                    # CPU
    python benchmarks/weclip_train.py --device cuda      # GPU (TF32 off, as the compat numerics want)
    python benchmarks/weclip_train.py --precision bf16 --rfm
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch

from tag2mask.clip.loading import round_weights_to_fp16
from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.methods.weclip.model import WeCLIP, preset
from tag2mask.runtime import resolve_device, resolve_dtype
from tag2mask.engine.schedules.poly import PolyWarmupAdamW
from tag2mask.methods.weclip.train_task import train_step

PAPER = {"sec_per_it": 0.54, "peak_gb": 6.2, "device": "RTX 3090 (paper Table 3)"}


def build(device: torch.device, batch: int, crop: int) -> tuple[WeCLIP, PolyWarmupAdamW]:
    """Random ViT-B/16 CLIP (fp16-rounded weights like the official loader) + WeCLIP, VOC preset."""
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(embed_dim=512, vision=VisionConfig(768, 12, 12, 224, 16), text=TextConfig(512, 12, 8)))
    clip.fingerprint = "random-init"  # never cache text embeddings of random weights
    round_weights_to_fp16(clip)  # as load_clip(round_fp16_weights=True): WeCLIP then holds no rounded copies
    clip = clip.to(device).eval()
    model = WeCLIP(clip, preset("voc", batch_size=batch, crop_size=crop), text_cache_dir=False).to(device)
    cfg = model.config
    opt = PolyWarmupAdamW([{"params": list(model.decoder.parameters())}], lr=cfg.lr, weight_decay=cfg.weight_decay,
                          max_iters=cfg.max_iters, warmup_iters=cfg.warmup_iters)
    return model, opt


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "CUDA max_memory_allocated"
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if platform.system() == "Darwin" else 1024) / 1e9, "process max RSS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--iters", type=int, default=5, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=320)
    ap.add_argument("--labels-per-image", type=int, default=2)
    ap.add_argument("--rfm", action="store_true", help="time the RFM branch (default: CAA, the first phase)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    amp = resolve_dtype(args.precision)
    model, opt = build(device, args.batch_size, args.crop)
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    rng = np.random.default_rng(0)
    images = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device)
    labels = [sorted(rng.choice(20, args.labels_per_image, replace=False).tolist()) for _ in range(args.batch_size)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(args.warmup + args.iters):
        sync()
        t = time.perf_counter()
        losses = train_step(model, model.decoder, opt, scaler, images, labels, args.rfm, amp)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    assert torch.isfinite(losses["loss"]), "non-finite loss"
    peak, what = peak_memory_gb(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    sec = float(np.median(times))
    print(f"WeCLIP training step, ViT-B/16-sized random CLIP, crop {args.crop}, batch {args.batch_size}, "
          f"{'RFM' if args.rfm else 'CAA'} branch, {args.precision}, median of {args.iters} iterations\n")
    print("| setup | device | s/it | peak memory (GB) | memory measure |")
    print("|---|---|---|---|---|")
    print(f"| tag2mask | {name} | {sec:.2f} | {peak:.2f} | {what} |")
    print(f"| paper | {PAPER['device']} | {PAPER['sec_per_it']:.2f} | {PAPER['peak_gb']:.1f} | (not stated) |")
    print(f"\n30k iterations at this speed: {sec * 30000 / 3600:.1f} h (paper: 4.5 h)")


if __name__ == "__main__":
    main()
