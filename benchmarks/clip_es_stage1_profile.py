"""Where CLIP-ES stage 1 spends its time on a CPU, against a plain inference forward of the same tower.

Model and images as ``benchmarks/clip_es_throughput.py`` (ViT-B/16-sized random CLIP with the official
fp16 weight rounding, 500x375, 3 labels). Every step of ``ClipES`` is timed by running the same
library functions the method runs, in the same order, on the same tensors; the steps are interleaved
with the plain forward and the whole ``ClipES`` call in one process, ``--repeats`` times, and the table
gives medians. Alternatives that would change no number are timed next to the step they could replace.

    OMP_NUM_THREADS=2 python benchmarks/clip_es_stage1_profile.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from clip_es_throughput import LABELS, build_model, make_images  # noqa: E402

from tag2mask.clip.model import CLIP_MEAN, CLIP_STD  # noqa: E402
from tag2mask.data.transforms import resize_pil, size_to_multiple, to_normalized_tensor  # noqa: E402
from tag2mask.localization.cam_pipeline import attention_affinity, refine_with_affinity, scale_to_size  # noqa: E402
from tag2mask.localization.gradcam import softmax_gradcam  # noqa: E402
from tag2mask.methods.clip_es.pipeline import ClipES, preset_for  # noqa: E402
from tag2mask.vocab.vocabulary import get_vocabulary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = build_model("cpu").requires_grad_(False)
    maker = ClipES(model, get_vocabulary("voc"), preset_for("voc"), text_cache_dir=False)
    image = make_images(1)[0]
    visual, cfg = model.visual, maker.config
    settings = cfg.cam_settings
    width, height = image.size
    h16, w16 = size_to_multiple(height, width, 16, "ceil")
    text, targets = maker.fg.select(LABELS, append=maker.bg.features)
    first = visual.num_blocks - cfg.attention_layers

    state: dict = {}

    def preprocess():
        state["x"] = to_normalized_tensor(resize_pil(image, h16, w16), CLIP_MEAN, CLIP_STD)

    def plain_forward():
        visual(state["x"])

    def encoder_with_maps():
        state["inter"] = visual.forward_intermediates(state["x"], visual.num_blocks - 1, return_attention=True,
                                                      keep_tokens=False, attention_from=first)

    def encoder_without_maps():
        visual.forward_intermediates(state["x"], visual.num_blocks - 1, keep_tokens=False)

    def gradcam(mode="loop"):
        inter = state["inter"]
        state["gc"] = softmax_gradcam(visual, inter.last[:1], inter.grid, text, targets, maker.logit_scale, vjp_mode=mode)

    def last_block_forward():
        visual.blocks[-1](state["inter"].last[:1], need_weights=True)

    def affinity_and_propagation():
        gc, inter = state["gc"], state["inter"]
        maps = torch.cat([torch.stack([a[0].float() for a in inter.attentions]), gc.last_attention[None].float()])
        state["ref"] = refine_with_affinity(gc.cams.float(), attention_affinity(maps, settings), settings)

    def upsample():
        state["high"] = scale_to_size(state["ref"].refined_lowres, (height, width), True).numpy().astype(np.float16)

    def upsample_torch():
        scale_to_size(state["ref"].refined_lowres, (height, width), False)

    def whole():
        state["whole"] = maker(image, LABELS).cams

    steps = [
        ("plain forward (12 blocks, fused attention)", plain_forward),
        ("ClipES, whole call", whole),
        ("1 preprocessing (PIL bicubic resize, normalise)", preprocess),
        ("2 blocks 1-11, maps of the last 7 formed explicitly", encoder_with_maps),
        ("  (blocks 1-11, fused attention everywhere)", encoder_without_maps),
        ("3 GradCAM: block 12 forward + 3 input-gradient passes (loop)", gradcam),
        ("  (block 12 forward alone, explicit attention)", last_block_forward),
        ("  (GradCAM with vmap'd gradients)", lambda: gradcam("vmap")),
        ("4 affinity, Sinkhorn, T^2, boxes, propagation", affinity_and_propagation),
        ("5 min-max + OpenCV-exact bilinear upsampling, float16", upsample),
        ("  (upsampling with torch interpolate: not bit-exact)", upsample_torch),
    ]
    for fn in (preprocess, encoder_with_maps, gradcam, affinity_and_propagation, upsample):
        fn()  # the state each step reads
    for _, fn in steps:  # warm-up
        fn()
    times = {name: [] for name, _ in steps}
    for _ in range(args.repeats):
        for name, fn in steps:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}
    plain = med[steps[0][0]]
    assert np.array_equal(state["whole"], state["high"]), "the timed steps do not reproduce the ClipES output"
    load = os.getloadavg()[0]
    print(f"CLIP-ES stage 1 profile, ViT-B/16-sized random CLIP, {width}x{height} ({w16}x{h16} in), {len(LABELS)} labels, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, load average "
          f"{load:.1f}, median of {args.repeats}, {time.strftime('%Y-%m-%d')}")
    print("| step | ms | x plain forward |")
    print("|---|---:|---:|")
    for name, _ in steps:
        print(f"| {name} | {med[name]:.0f} | {med[name] / plain:.2f} |")
    parts = sum(med[n] for n, _ in steps if n[0].isdigit())
    print(f"| sum of steps 1-5 | {parts:.0f} | {parts / plain:.2f} |")
    # the floor set by the K input-gradient passes (what exact GradCAM cannot avoid)
    block = plain / visual.num_blocks
    per_class = (med[steps[5][0]] - med[steps[6][0]]) / len(LABELS)
    print(f"| one block of the plain forward (plain / {visual.num_blocks}) | {block:.0f} | {block / plain:.2f} |")
    print(f"| one input-gradient pass through block 12 (per class) | {per_class:.0f} | {per_class / plain:.2f} |")
    print(f"\nper-class gradient pass = {per_class / block:.2f} blocks; with {len(LABELS)} classes the gradients alone "
          f"add {len(LABELS) * per_class / plain:.2f} x the plain forward")


if __name__ == "__main__":
    main()
