"""Does a CLIP's attention link the patches of one object? The premise of CLIP-ES's attention affinity.

    python benchmarks/attention_grouping.py --n 20 [--weights FILE]

On synth val scenes (ground truth used for scoring only), for each block's head-averaged attention
(CLS row and column dropped, rows renormalised) and for CLIP-ES's transition matrix (mean of the
last 8 maps, Sinkhorn x3, symmetrised, squared; also without the square), prints the share of a
patch's attention that lands on patches of its own label, for object patches and for background
patches, next to what uniform attention would give (the share of the image with that label).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from tag2mask.cmdline.options import shipped_weights_path
from tag2mask.clip.loading import load_clip
from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
from tag2mask.data.transforms import to_normalized_tensor
from tag2mask.localization.affinity import mean_attention, transition_matrix
from tag2mask.synth.splits import SyntheticDataset


def own_label_share(attention: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """(object share, object uniform share, background share, background uniform share) of one map.

    attention: (n, n) non-negative, rows = source patches; labels: (n,) patch labels, 0 = background.
    """
    rows = attention / attention.sum(axis=1, keepdims=True)
    same = labels[:, None] == labels[None, :]
    share = (rows * same).sum(axis=1)
    uniform = same.mean(axis=1)
    obj = labels != 0
    return share[obj].mean(), uniform[obj].mean(), share[~obj].mean(), uniform[~obj].mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="synth val scenes")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--weights", default=None, help="CLIP weights (default: the shipped tiny CLIP)")
    args = ap.parse_args()
    model = load_clip(args.weights or shipped_weights_path())
    visual = model.visual
    data = SyntheticDataset("val", args.n, args.size)
    rows: dict[str, list] = {}
    for i in range(args.n):
        scene = data[i]
        x = to_normalized_tensor(Image.fromarray(scene.image), CLIP_MEAN, CLIP_STD)
        with torch.no_grad():
            inter = visual.forward_intermediates(x, return_attention=True, keep_tokens=False)
        gh, gw = inter.grid
        labels = np.asarray(Image.fromarray(scene.mask).resize((gw, gh), Image.NEAREST)).reshape(-1)
        maps = [a[0].float() for a in inter.attentions]
        for b, a in enumerate(maps):
            rows.setdefault(f"block {b}", []).append(own_label_share(a[1:, 1:].double().numpy(), labels) + (float(a[1:, 0].mean()),))
        w = mean_attention(maps, last=8)
        for name, power in (("CLIP-ES transition (power 2)", 2), ("same, power 1", 1)):
            t = transition_matrix(w, rounds=3, power=power).double().numpy()
            rows.setdefault(name, []).append(own_label_share(t, labels) + (float("nan"),))
    print(f"{args.n} synth val scenes at {args.size} px, weights {args.weights or 'shipped tiny CLIP'}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| attention | object -> own object | uniform | background -> background | uniform | patch -> CLS |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in rows.items():
        m = np.array(values, dtype=np.float64).mean(axis=0)
        cls = "" if np.isnan(m[4]) else f"{m[4]:.2f}"
        print(f"| {name} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]:.2f} | {cls} |")


if __name__ == "__main__":
    main()
