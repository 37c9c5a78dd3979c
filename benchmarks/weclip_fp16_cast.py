"""Why the WeCLIP decoder's logits differ from the official fixture by ~2e-4: measured, not guessed.

The released decoder casts every attention output projection to fp16 (input, weight, bias; fp16
result added to the float32 residual). An fp16 value has 2^13 times the spacing of a float32 one, so
a 1-ulp float32 difference in the projection's input, such as a different summation order in a
matmul (other BLAS kernel, CPU, thread count or batch split), flips the fp16 rounding of some outputs,
and the flips propagate through the following blocks. This script measures, on
``tests/data/weclip/decoder.npz`` with the fixture's decoder state:

1. the error against the fixture with and without the cast (this machine, this thread count);
2. how far the same decoder moves when only the summation order changes (threads 1 vs 2, the batch
   split into single images, the fuse MLPs as 11 separate linears instead of one batched matmul),
   with and without the cast;
3. the flip rate of the fp16 cast when its float32 input moves by one ulp.

    OMP_NUM_THREADS=1 python benchmarks/weclip_fp16_cast.py
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tag2mask.models.weclip_decoder import WeCLIPDecoder, load_official_decoder_state

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "weclip"


def _decoder(fx: dict, state: dict, cast: bool) -> WeCLIPDecoder:
    dec = WeCLIPDecoder(in_channels=fx["input"].shape[2], num_classes=fx["seg_logits"].shape[1],
                        compat_fp16_out_proj=cast).eval()
    dec.load_state_dict(load_official_decoder_state(state))
    return dec


def _transformer(dec: WeCLIPDecoder, fused: torch.Tensor) -> torch.Tensor:
    b, d, h, w = fused.shape
    x = fused.flatten(2).permute(2, 0, 1)
    for blk in dec.blocks:
        x = blk(x)
    return dec.classifier(x.permute(1, 2, 0).reshape(b, d, h, w))


def _per_layer_fuse(dec: WeCLIPDecoder, x_all: torch.Tensor) -> torch.Tensor:
    """The official order: one ``nn.Linear`` pair per CLIP layer (our default batches the 11 layers)."""
    outs = []
    for i, m in enumerate(dec.layer_mlps):
        x = x_all[i].float()
        n, _, h, w = x.shape
        t = F.linear(F.relu(F.linear(x.flatten(2).transpose(1, 2), m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
        outs.append(t.permute(0, 2, 1).reshape(n, -1, h, w))
    return dec.fuse(torch.cat(outs, dim=1))


@torch.no_grad()
def variants(dec: WeCLIPDecoder, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Logits of the same decoder under different summation orders."""
    out = {"default": dec(x).seg_logits.numpy()}
    out["batch split"] = torch.cat([dec(x[:, i : i + 1]).seg_logits for i in range(x.shape[1])]).numpy()
    out["per-layer fuse"] = _transformer(dec, _per_layer_fuse(dec, x)).numpy()
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1
    torch.set_num_threads(other)
    out[f"{other} thread(s)"] = dec(x).seg_logits.numpy()
    torch.set_num_threads(threads)
    return out


@torch.no_grad()
def flip_rate(dec: WeCLIPDecoder, x: torch.Tensor) -> tuple[float, int]:
    """Fraction of fp16 out-projection outputs (first block) that change when the input moves by 1 ulp."""
    fused = dec.fuse_features(x)
    t = fused.flatten(2).permute(2, 0, 1)
    blk = dec.blocks[0]
    a = blk.norm1(t)
    attn = blk.attn
    seq, b, dim = a.shape
    hd = dim // attn.heads
    q, k, v = F.linear(a, attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
    split = lambda z: z.contiguous().view(seq, b * attn.heads, hd).transpose(0, 1)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    o = torch.bmm(torch.bmm(q / hd**0.5, k.transpose(1, 2)).softmax(-1), v).transpose(0, 1).contiguous().view(seq, b, dim)
    nudged = torch.nextafter(o, torch.full_like(o, float("inf")))
    proj = lambda z: F.linear(z.half(), attn.out_proj.weight.half(), attn.out_proj.bias.half())  # noqa: E731
    changed = proj(o) != proj(nudged)
    return float(changed.float().mean()), int(changed.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    with np.load(DATA / "decoder.npz") as z:
        fx = {k: z[k] for k in z.files}
    with np.load(DATA / "decoder_state.npz") as z:
        state = {k: z[k] for k in z.files}
    x = torch.from_numpy(fx["input"])
    ref = fx["seg_logits"]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)")
    print("\n| decoder | variant | max abs vs fixture | mean abs vs fixture | max abs vs default order |")
    print("|---|---|---|---|---|")
    for cast in (True, False):
        dec = _decoder(fx, state, cast)
        outs = variants(dec, x)
        for name, logits in outs.items():
            err = np.abs(logits - ref)
            own = np.abs(logits - outs["default"]).max()
            label = "fp16 out-proj (official)" if cast else "float32"
            print(f"| {label} | {name} | {err.max():.2e} | {err.mean():.2e} | {own:.2e} |")
    rate, n = flip_rate(_decoder(fx, state, True), x)
    print(f"\nfirst block: a +1 float32-ulp change of the out-projection input flips {100 * rate:.2f}% of its "
          f"{n} fp16 outputs")


if __name__ == "__main__":
    main()
