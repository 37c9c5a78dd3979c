"""Training speed and peak memory of the segmentation networks (random weights, same compute).

One iteration = ``training_loss`` forward + backward + SGD step on a random batch with a random
target (10 % ignored). Networks (the recipes they serve):

* ``deeplab-v2``: ResNet-101, output stride 8, crop 321, frozen BN (CLIP-ES stage 3, deeplab-pytorch);
* ``deeplab-v2-msc``: the same with deeplab-pytorch's multi-scale training (scales 0.5, 0.75 + max);
* ``segformer-b2``: MiT-b2 SegFormer, crop 512 (CLIP-ZSS student size);
* ``clip-decoder``: frozen ViT-B/16-sized CLIP + WeCLIP's decoder, crop 320 (WeCLIP fully supervised);
* ``upernet``, ``mask2former``: ConvNeXt-T UperNet and Swin-T Mask2Former, crop 512 (opt-in, slow on CPU);
* ``maskclip+``: one MaskCLIP+ step (``maskclip+:voc20``, crop 512): the frozen ViT-B/16-sized MaskCLIP
  teacher labels every pixel of the crop, then the DeepLab-v2 target model (ResNet-101 v1c, ``bn`` ASPP,
  dot-product text head over 20 class embeddings, BN trained) trains on those labels; the teacher's
  share of the step is timed separately.

Each network runs in its own subprocess so that the peak memory is its own (CPU: the process's
max RSS minus the RSS after ``import torch`` and building nothing; CUDA: ``max_memory_allocated``).
All networks are measured in one run, so their ratios are comparable; the machine's load average
is printed with the table.

    python benchmarks/segmenter_speed.py                         # CPU, batch 1, default networks
    python benchmarks/segmenter_speed.py --device cuda --batch 8 --models deeplab-v2 segformer-b2 upernet mask2former
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (build_segmenter name, options, crop, classes)
NETWORKS = {
    "deeplab-v2": ("deeplab-v2", {"variant": "resnet101", "norm_eval": True, "loss_at_logit_resolution": True}, 321, 21),
    "deeplab-v2-msc": ("deeplab-v2", {"variant": "resnet101", "norm_eval": True, "msc_scales": [0.5, 0.75],
                                      "loss_at_logit_resolution": True}, 321, 21),
    "segformer-b2": ("segformer", {"variant": "b2"}, 512, 21),
    "clip-decoder": ("clip-decoder", {}, 320, 21),
    "upernet": ("upernet", {"backbone": "convnext-tiny"}, 512, 21),
    "mask2former": ("mask2former", {"backbone": "swin-tiny"}, 512, 21),
    "maskclip+": ("maskclip+", {}, 512, 20),
}
DEFAULT = ["deeplab-v2", "deeplab-v2-msc", "segformer-b2", "clip-decoder"]


def _rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if platform.system() == "Darwin" else 1024) / 1e9


def _vit_b16_clip():
    from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig

    return CLIP(CLIPConfig(embed_dim=512, vision=VisionConfig(768, 12, 12, 224, 16), text=TextConfig(512, 12, 8))).eval()


def _maskclip_plus(device, crop: int):
    """(network, teacher) of a ``maskclip+:voc20`` run over a random ViT-B/16-sized CLIP."""
    from types import SimpleNamespace

    from tag2mask.methods.maskclip_plus.recipe import MaskClipPlus, maskclip_plus_config

    mcp = MaskClipPlus(_vit_b16_clip().to(device), text_cache=False)
    # one prompt template: the 85 published ones cost minutes of text encoding at setup (not timed)
    config = maskclip_plus_config("voc20", crop_size=crop, teacher={"templates": ["a photo of a {}."]})
    model = mcp.network(config)
    return model, mcp.teacher(config, SimpleNamespace(device=device), model)


def run_one(key: str, device_name: str, batch: int, iters: int, warmup: int, precision: str) -> dict:
    """Measure one network in this process; returns a result row."""
    import torch

    from tag2mask.models import build_segmenter
    from tag2mask.runtime import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    base_rss = _rss_gb()
    name, options, crop, classes = NETWORKS[key]
    torch.manual_seed(0)
    teacher = None
    if name == "maskclip+":
        model, teacher = _maskclip_plus(device, crop)
    else:
        extra = {"clip_model": _vit_b16_clip()} if name == "clip-decoder" else {}
        model = build_segmenter(name, classes, **options, **extra)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=g).to(device)
    target = torch.randint(0, classes, (batch, crop, crop), generator=g)
    target[torch.rand(batch, crop, crop, generator=g) < 0.1] = 255
    target = target.to(device)
    if teacher is not None:  # every pixel but the ignored ones is the teacher's (annotation-free)
        target = torch.where(target == 255, target, torch.full_like(target, -1))
    teacher_s = [0.0]
    dtype = resolve_dtype(precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        labels = target
        if teacher is not None:
            tic = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                labels = teacher(images, target, 0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            teacher_s[0] += time.perf_counter() - tic
            labels = torch.where(labels < 0, torch.full_like(labels, 255), labels)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model.training_loss(images, labels)["loss"]
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    teacher_s[0] = 0.0
    tic = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec = (time.perf_counter() - tic) / iters
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else _rss_gb() - base_rss
    return {
        "network": key, "crop": crop, "batch": batch, "s_per_it": sec, "img_per_s": batch / sec, "peak_gb": peak,
        "teacher_s_per_it": teacher_s[0] / iters if teacher is not None else None,
        "trainable_m": sum(p.numel() for p in params) / 1e6, "total_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT, choices=sorted(NETWORKS))
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per network")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one network, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.batch, args.iters, args.warmup, args.precision)))
        return

    load_before = os.getloadavg()
    rows = []
    for key in args.models:
        cmd = [sys.executable, __file__, "--one", key, "--device", args.device, "--batch", str(args.batch),
               "--iters", str(args.iters), "--warmup", str(args.warmup), "--precision", args.precision]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            print(f"{key}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  measured {key}", file=sys.stderr)
    load_after = os.getloadavg()

    import torch

    mem = "CUDA max allocated" if args.device.startswith("cuda") else "max RSS above the bare process"
    print(f"device {args.device}, precision {args.precision}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, threads {torch.get_num_threads()}; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"| network | crop | batch | s/it | of which teacher | img/s | peak memory ({mem}) | trainable / total params |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        teacher = "–" if r.get("teacher_s_per_it") is None else f"{r['teacher_s_per_it']:.2f}"
        print(f"| {r['network']} | {r['crop']} | {r['batch']} | {r['s_per_it']:.2f} | {teacher} | {r['img_per_s']:.3g} | "
              f"{r['peak_gb']:.2f} GB | {r['trainable_m']:.1f} M / {r['total_m']:.1f} M |")
    if rows:
        ref = rows[0]
        print(f"\nrelative time per image (vs {ref['network']}): " + ", ".join(
            f"{r['network']} {ref['img_per_s'] / r['img_per_s']:.2f}x" for r in rows))


if __name__ == "__main__":
    main()
