"""A private test double of the tag2mask.models interface (one convolution) and a tiny data set on disk.

``OneConv`` has what the segmenter trainer uses of a network: ``forward``, ``training_loss`` (softmax
CE, ignore 255, mean over labelled pixels), ``normalization`` (callable on 0..1 RGB) and
``output_stride``. Also runnable under torchrun::

    python -m torch.distributed.run --nproc-per-node 2 tests/_seg_double.py DATA OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("square", "disk")  # foreground; label 0 = background


class _Normalization:
    mean = (0.4, 0.5, 0.6)
    std = (0.25, 0.2, 0.3)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() - m) / s


class OneConv(nn.Module):
    def __init__(self, num_classes: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, kernel, padding=kernel // 2)
        self.normalization = _Normalization()
        self.output_stride = 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)

    def training_loss(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self(images).float(), target, ignore_index=255)
        return {"loss": ce, "ce": ce.detach()}


def factory(kernel: int = 3):
    def build(config) -> OneConv:
        return OneConv(config.num_classes, kernel)

    return build


def make_dataset(root: Path, n: int = 6, size: tuple[int, int] = (40, 48), ignore: bool = True, seed: int = 0) -> Path:
    """Images + a `tag2mask label`-style run folder (masks/ palette PNGs, run.json with the classes)."""
    from PIL import Image

    from tag2mask.io.palette import save_label_png

    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        mask = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y : y + h // 2, x : x + w // 3] = 1
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < (h // 6) ** 2] = 2
        colours = np.array([[40, 90, 40], [200, 60, 50], [60, 70, 210]], np.float32)
        rgb = colours[mask] + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(images / f"im{i}.png")
        if ignore:  # low-confidence band, as `tag2mask label --refine crf` marks it
            mask[np.abs(yy - cy) < 2] = 255
        save_label_png(labels / "masks" / f"im{i}.png", mask)
    (labels / "run.json").write_text(json.dumps({"command": "label", "classes": list(CLASSES)}))
    return root


def main(argv: Optional[list[str]] = None) -> int:
    from tag2mask.data.segmentation import open_segmentation_data
    from tag2mask.engine.loop import RunOptions, train
    from tag2mask.segmenter.task import SegmenterTask

    data, out = (argv or sys.argv[1:])[:2]
    config = segmenter_config()
    source = open_segmentation_data(Path(data) / "images", None, Path(data) / "labels", config.num_classes)
    task = SegmenterTask(config, source, None, model_factory=factory())
    train(task, RunOptions(out_dir=out, device="cpu", seed=2, ckpt_every=3, log_every=1, progress=False))
    return 0


def segmenter_config(**overrides):
    from tag2mask.methods.registry import segmenter_preset

    base = dict(model="one-conv", classes=CLASSES, crop_size=24, scales=(1.0,), batch_size=4, max_iters=6,
                optimizer="sgd", lr=0.05, lr_step=1, head_lr_mult=1.0, head_bias_lr_mult=1.0, photometric=False)
    base.update(overrides)
    return segmenter_preset(None, **base)


if __name__ == "__main__":
    sys.exit(main())
