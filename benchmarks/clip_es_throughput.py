"""CLIP-ES throughput: tag2mask's pipeline against a reference that follows the official loop.

Model: a randomly initialised CLIP with ViT-B/16 shapes (compute equals the real model's).
Images: VOC-like 500x375 with 3 labels each. The reference is written here from the structure of
the official ``generate_cams_voc12.py``: all CLIP weights trainable, one forward + backward of the
last block per class (weight gradients included), CAM arithmetic in NumPy, the attention stack and
Sinkhorn recomputed per class, float32. Outputs of both are compared (max |diff| of the CAMs).

Each variant runs in its own subprocess so that peak memory is measured separately:

    python benchmarks/clip_es_throughput.py                 # CPU table (fp32 + bf16)
    python benchmarks/clip_es_throughput.py --device cuda   # GPU
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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.clip.loading import round_weights_to_fp16
from tag2mask.clip.model import CLIP, CLIP_MEAN, CLIP_STD, CLIPConfig, TextConfig, VisionConfig
from tag2mask.data.transforms import resize_pil, size_to_multiple, to_normalized_tensor
from tag2mask.localization.boxes import cam_box_mask
from tag2mask.localization.scaling import minmax_scale, resize_bilinear_like_cv2
from tag2mask.methods.clip_es.pipeline import ClipES, preset_for
from tag2mask.vocab.vocabulary import get_vocabulary

LABELS = [14, 11, 8]  # person, dog, chair


def build_model(device: str) -> CLIP:
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=512, vision=VisionConfig(768, 12, 12, 224, 16), text=TextConfig(512, 12, 8))
    model = CLIP(cfg).eval()
    # sharpen attention like a trained model so that the affinity path does real work
    with torch.no_grad():
        for blk in model.visual.blocks:
            blk.attn.in_proj_weight[: 2 * 768] *= 3.0
    # the official numerics up front (as load_clip(round_fp16_weights=True)), so ClipES needs no rounded
    # copies and the reference loop runs with the same weights and fp16-rounded positional embeddings
    round_weights_to_fp16(model)
    model.visual.round_pos_embed_fp16 = True
    model.fingerprint = "benchmark-random"
    return model.to(device)


def make_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        base = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
        out.append(Image.fromarray(base).resize((500, 375), Image.BILINEAR))
    return out


# --------------------------------------------------------------------------------------------------
# reference: the official loop structure
def reference_cams(model: CLIP, image: Image.Image, fg: torch.Tensor, bg: torch.Tensor, labels: list[int]) -> np.ndarray:
    visual = model.visual
    device = fg.device
    w, h = image.size
    h16, w16 = size_to_multiple(h, w, 16)
    x = to_normalized_tensor(resize_pil(image, h16, w16), CLIP_MEAN, CLIP_STD).to(device)
    with torch.no_grad():
        inter = visual.forward_intermediates(x, visual.num_blocks - 1, return_attention=True, keep_tokens=False)
    gh, gw = inter.grid
    text = torch.cat([fg[labels], bg])
    scale = float(model.logit_scale.exp())
    block = visual.blocks[-1]
    outs = []
    attn_list = [a[0] for a in inter.attentions]
    for k in range(len(labels)):
        model.zero_grad(set_to_none=True)
        store = {}

        def hook(a):
            a.retain_grad()
            store["a"] = a
            return a

        with torch.enable_grad():
            out, attn = block(inter.last, need_weights=True, ln1_hook=hook)
            feats = F.normalize(visual.head(out[:, 1:]).mean(1), dim=-1)
            probs = (scale * feats @ F.normalize(text, dim=-1).t()).softmax(-1)
            probs[0, k].backward(retain_graph=True)
        act = store["a"].detach()[0, 1:].cpu().numpy().T.reshape(-1, gh, gw)
        grad = store["a"].grad[0, 1:].cpu().numpy().T.reshape(-1, gh, gw)
        weights = grad.mean(axis=(1, 2))
        cam = np.maximum((weights[:, None, None] * act).sum(0), 0).astype(np.float32)
        for _ in range(2):
            cam = cam - cam.min()
            cam = cam / (1e-7 + cam.max())
        # attention stack + Sinkhorn recomputed per class, as in the official loop
        stack = torch.stack(attn_list + [attn[0].detach()])[-8:, 1:, 1:].mean(0).float()
        t = stack
        for _ in range(3):
            t = t / t.sum(0, keepdim=True)
            t = t / t.sum(1, keepdim=True)
        t = (t + t.t()) / 2
        t = t @ t
        mask, _ = cam_box_mask(cam, 0.4)
        trans = t.cpu() * torch.from_numpy(mask).reshape(1, -1)
        refined = (trans @ torch.from_numpy(cam).reshape(-1, 1)).reshape(gh, gw).numpy()
        outs.append(minmax_scale(refined))
    low = np.stack(outs).astype(np.float32)
    return resize_bilinear_like_cv2(low, (h, w)).astype(np.float16)


def run_variant(variant: str, device: str, n: int, warmup: int) -> dict:
    torch.set_grad_enabled(True)
    model = build_model(device)
    vocab = get_vocabulary("voc")
    precision = "bf16" if "bf16" in variant else ("fp16" if "fp16" in variant else "fp32")
    maker = ClipES(model, vocab, preset_for("voc", precision=precision), text_cache_dir=False)
    images = make_images(n + warmup)
    if variant.startswith("reference"):
        model.requires_grad_(True)
        fg, bg = maker.fg.features, maker.bg.features
        fn = lambda im: reference_cams(model, im, fg, bg, LABELS)  # noqa: E731
    else:
        model.requires_grad_(False)
        fn = lambda im: maker(im, LABELS).cams  # noqa: E731
    batch = int(variant.split("batch")[1].split("-")[0]) if "batch" in variant else 1
    for im in images[:warmup]:
        fn(im)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if batch > 1:  # equal-size images share the frozen encoder passes
        timed = images[warmup:]
        outs = [r.cams for i in range(0, n, batch) for r in maker.batch(timed[i : i + batch], [LABELS] * len(timed[i : i + batch]))]
    else:
        outs = [fn(im) for im in images[warmup:]]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    np.save(f"/tmp/clip_es_bench_{variant}_{device.replace(':', '')}.npy", np.stack(outs).astype(np.float32))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "images_per_s": n / dt, "s_per_image": dt / n, "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=6, help="timed images per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["reference", "ours", "ours-bf16"],
                    help="reference | ours | ours-bf16 | ours-fp16 | ours-batch8 | ours-batch8-bf16 ...")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.device, args.n, args.warmup)))
        return
    rows = []
    for v in args.variants:
        cmd = [sys.executable, __file__, "--child", v, "--device", args.device, "--n", str(args.n), "--warmup", str(args.warmup)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            raise SystemExit(f"variant {v} failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    dev = args.device.replace(":", "")
    ref = np.load(f"/tmp/clip_es_bench_reference_{dev}.npy") if "reference" in args.variants else None
    base = next((r["images_per_s"] for r in rows if r["variant"] == "reference"), None)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"CLIP-ES throughput, ViT-B/16-sized random CLIP, 500x375, {len(LABELS)} labels/image, device {args.device} ({name}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}")
    print("| variant | images/s | s/image | speed-up | peak memory (MiB) | max abs diff vs reference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        out = np.load(f"/tmp/clip_es_bench_{r['variant']}_{dev}.npy")
        diff = float(np.abs(out - ref).max()) if ref is not None else float("nan")
        speed = r["images_per_s"] / base if base else float("nan")
        print(f"| {r['variant']} | {r['images_per_s']:.3f} | {r['s_per_image']:.3f} | {speed:.2f}x | {r['peak_mib']:.0f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
