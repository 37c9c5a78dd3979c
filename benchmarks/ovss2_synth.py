"""SC-CLIP, PEARL and CorrCLIP beside MaskCLIP, SCLIP, ClearCLIP and NACLIP on the synthetic world.

The shipped tiny CLIP has 6 blocks (SC-CLIP's fixed block indices need 11+) and no DINO exists for
the synthetic world, so this benchmark takes a deeper tiny CLIP trained on CPU with
``python -m tag2mask.tiny_clip.trainer`` (12 vision blocks; command in docs/benchmarks.md) and a
"DINO stand-in" made here:

    python benchmarks/ovss2_synth.py train-dino --clip CLIP.safetensors --out runs/dino_standin.safetensors
    python benchmarks/ovss2_synth.py evaluate --clip CLIP.safetensors --dino runs/dino_standin.safetensors

**The stand-in is not DINO.** It is a small ViT in the layout of Meta's DINO backbones
(:class:`tag2mask.models.dino.DinoViT`, read back by :func:`tag2mask.models.dino.load_dino`) trained,
without labels, so that the feature CorrCLIP takes from DINO -- ``q + k`` of its last block -- has the
same patch-to-patch cosine similarities as the tiny CLIP's final patch tokens (relational
distillation: MSE between the two ``(hw, hw)`` cosine matrices) on synth *train* scenes. It can only
be as good at grouping patches as the CLIP it copies; no self-supervised DINO objective is involved.

``evaluate`` scores every method on the same synth scenes (default: 60 val scenes at 224 px, the
scenes of docs/tiny_clip.md's CPU-model tables) through :func:`tag2mask.cli.demo_scenes.evaluate_methods`,
one warm-up scene per method, and prints mIoU and s/image side by side with the machine, threads and
load; SC-CLIP and CorrCLIP run through the same demo factories as ``tag2mask demo``. CorrCLIP runs once per region source (``slic``, ``felzenszwalb``, and ``sam`` only with
``--sam-weights``: there is no trained tiny SAM in the project, and a random one's regions would
measure nothing). Its s/image includes making the region map.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tag2mask.clip.loading import load_clip
from tag2mask.clip.model import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from tag2mask.models.dino import DinoViT

OVSS = ("maskclip", "sclip", "clearclip", "naclip", "pearl")
TEACHERS = ("dense_std", "dense_maskclip", "dense_value")  # tag2mask.tiny_clip.evaluation.image_features


def _normalise(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """``(B, 3, H, W)`` float in 0..1 -> normalised with ``mean`` / ``std``."""
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _cosine_matrix(feats: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, N, N)`` cosine similarities."""
    f = F.normalize(feats, dim=-1)
    return f @ f.transpose(1, 2)


def _to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Square-grid patch tokens ``(B, n*n, C)`` -> ``(B, h*w, C)`` on ``grid`` (bilinear; the CLIP's patch
    size may differ from the stand-in's)."""
    b, n, c = tokens.shape
    side = int(round(n ** 0.5))
    if (side, side) == tuple(grid):
        return tokens
    maps = tokens.transpose(1, 2).reshape(b, c, side, side)
    return F.interpolate(maps, size=grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def _scene_pool(n: int, size: int) -> torch.Tensor:
    """``(n, 3, size, size)`` uint8 synth *train* images (never the val / test scenes scored later)."""
    from tag2mask.synth.splits import SyntheticDataset

    data = SyntheticDataset("train", n, size)
    return torch.from_numpy(np.stack([data[i].image for i in range(n)])).permute(0, 3, 1, 2).contiguous()


def _init_student(args: argparse.Namespace) -> DinoViT:
    """A DINO-layout ViT initialised as DINO's (truncated normal, std 0.02; zero biases)."""
    student = DinoViT(args.width, args.depth, args.width // 64, patch_size=args.patch,
                      pretrain_grid=args.image_size // args.patch)
    for p in (student.pos_embed, student.cls_token):
        torch.nn.init.trunc_normal_(p, std=0.02)
    for m in student.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.trunc_normal_(m.weight, std=0.02)
            torch.nn.init.zeros_(m.bias)
    return student


def train_dino(args: argparse.Namespace) -> None:
    """Distil the CLIP's patch-token similarities into the DINO stand-in's last-block ``q + k``."""
    from safetensors.torch import save

    from tag2mask.io.atomic import atomic_write_bytes, atomic_write_text
    from tag2mask.tiny_clip.evaluation import image_features

    torch.manual_seed(args.seed)
    clip = load_clip(args.clip).eval().requires_grad_(False)
    student = _init_student(args).train()
    t0 = time.time()
    pool = _scene_pool(args.images, args.image_size)
    print(f"pool: {args.images} train scenes at {args.image_size} px in {time.time() - t0:.0f} s", flush=True)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    for step in range(args.steps):
        # linear warm-up then cosine decay to 0 over the fixed step count (deterministic, no time budget)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(pool), (args.batch_size,), generator=gen)
        x = pool[idx].float() / 255
        flip = torch.rand(args.batch_size, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        feats, grid = student.last_qk(_normalise(x, IMAGENET_MEAN, IMAGENET_STD))
        with torch.no_grad():
            teacher = image_features(clip, _normalise(x, CLIP_MEAN, CLIP_STD))[args.teacher].float()
            target = _cosine_matrix(_to_grid(teacher, grid))
        loss = F.mse_loss(_cosine_matrix(feats), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 6), "lr": lr, "s": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    out = Path(args.out)
    state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    # bytes, then an atomic write: safetensors' save_file would recreate the file with mode 0600 whatever the umask
    atomic_write_bytes(out, save(state, metadata={"what": "DINO-layout ViT distilled from a tiny CLIP; not DINO"}))
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    atomic_write_text(out.with_suffix(".json"), json.dumps({"settings": settings, "log": log}, indent=2))
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


def evaluate(args: argparse.Namespace) -> None:
    """mIoU and s/image of every method on the same synth scenes, with the machine's threads and load.

    CorrCLIP gets its DINO and region source the way ``tag2mask demo --dino --regions`` hands them over
    (the registry's ``inputs``); one pass of :func:`evaluate_methods` per region source, the other methods
    in the first pass (every pass regenerates the same scenes, so all rows score the same images)."""
    from tag2mask.cli.demo_scenes import evaluate_methods
    from tag2mask.methods.corrclip.segmenter import region_source
    from tag2mask.models.dino import load_dino
    from tag2mask.tiny_clip.evaluation import zero_shot_map

    model = load_clip(args.clip).eval()
    load_start = os.getloadavg()
    t0 = time.time()
    zs = zero_shot_map(model, n_val=200)
    dino = load_dino(args.dino) if args.regions else None
    passes = [(r, {"dino": dino, "regions": region_source(r, "cpu", args.sam_weights)}) for r in args.regions
              if r != "sam" or args.sam_weights]
    if "sam" in args.regions and not args.sam_weights:
        print("corrclip (sam): skipped, no --sam-weights (the project has no trained tiny SAM)")
    scores = {}
    for i, (regions, inputs) in enumerate(passes or [(None, None)]):
        methods = (list(args.methods) if i == 0 else []) + (["corrclip"] if regions else [])
        got = evaluate_methods(model, args.n, methods, size=args.size, split=args.split,
                               inputs={"corrclip": inputs} if regions else None)
        scores.update({(f"corrclip ({regions})" if k == "corrclip" else k): v for k, v in got.items()})
    print(f"synth {args.split}, {args.n} scenes at {args.size} px, CLIP {args.clip} ({model.visual.num_blocks} "
          f"blocks), DINO stand-in {args.dino}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s); "
          f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {time.time() - t0:.0f} s")
    print(f"zero-shot multi-label mAP (200 val scenes): {zs:.3f}")
    print("| method | mIoU (%) | s / image |\n|---|---:|---:|")
    for name, s in scores.items():
        print(f"| {name} | {100 * s.miou:.1f} | {s.seconds / max(1, args.n):.2f} |")
    if args.json:
        from tag2mask.io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"map": zs, "n": args.n, "split": args.split, "results": {
            k: {"miou": s.miou, "s_per_image": s.seconds / max(1, args.n)} for k, s in scores.items()}}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)
    t = sub.add_parser("train-dino", help="distil the DINO stand-in from a tiny CLIP")
    t.add_argument("--clip", required=True, help="tiny CLIP weights (the teacher)")
    t.add_argument("--out", required=True, help="stand-in weights (.safetensors, Meta's DINO key layout)")
    t.add_argument("--teacher", default="dense_std", choices=TEACHERS, help="which CLIP patch features to copy")
    t.add_argument("--images", type=int, default=2000, help="synth train scenes in the pool")
    t.add_argument("--image-size", type=int, default=112)
    t.add_argument("--patch", type=int, default=8)
    t.add_argument("--width", type=int, default=64, help="a multiple of 64: heads = width // 64, DINO's rule, "
                   "which load_dino applies to a file that does not record its heads")
    t.add_argument("--depth", type=int, default=4)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=25)
    t.set_defaults(func=train_dino)
    e = sub.add_parser("evaluate", help="mIoU and s/image of all seven methods")
    e.add_argument("--clip", required=True)
    e.add_argument("--dino", default=None, help="the stand-in from train-dino (or any load_dino source); "
                   "needed with --regions")
    e.add_argument("--n", type=int, default=60)
    e.add_argument("--split", default="val", choices=["train", "val", "test"])
    e.add_argument("--size", type=int, default=224)
    e.add_argument("--methods", nargs="+", default=[*OVSS, "scclip"], choices=[*OVSS, "scclip"])
    e.add_argument("--regions", nargs="*", default=["slic", "felzenszwalb", "sam"],
                   choices=["slic", "felzenszwalb", "sam"], help="CorrCLIP region sources (none: no CorrCLIP)")
    e.add_argument("--sam-weights", default=None, help="a SamModel folder for --regions sam")
    e.add_argument("--json", default=None, help="also write the numbers here")
    e.set_defaults(func=evaluate)
    args = ap.parse_args()
    if args.func is evaluate and args.regions and not args.dino:
        ap.error("CorrCLIP (--regions) needs --dino; give --regions with no value to leave CorrCLIP out")
    if args.func is train_dino and (args.width % 64 or args.width < 64):
        ap.error("--width must be a multiple of 64 (heads = width // 64)")
    args.func(args)


if __name__ == "__main__":
    main()
