"""FMA-WSSS prompt-training data: image sources with image-level labels (and seeds), the official
augmentation, and the position-based training stream.

Sources (:func:`open_fma_data`): ``synth`` (tag2mask's synthetic world, generated on the fly), a
VOC root, a COCO root in the WSSS layout, or an image folder with a JSON/CSV label file; for the
segmentation stage each image also needs its seed mask (``<name>.png``: 0 background, class id + 1,
255 ignore), e.g. the ``masks/`` of a ``tag2mask label --method fma`` run.

Augmentation (:func:`augment`, official ``VOC2Auger`` with ``rand_range`` / ``alchemy_cat``
augmenters), in this order: colour jitter; random rescale (long side to a random integer in
``long_side`` unless the short side would fall below ``short_side_min``: then the short side to
``short_side_min``; PIL bicubic, seeds nearest); a random ``crop x crop`` window; horizontal flip
with p = 0.5; ``ToTensor`` + CLIP normalisation. The colour jitter follows AlchemyCat's
``RandColorJitter`` (brightness +-25, contrast x U(0.6, 1.4), saturation x U(0.5, 1.5), hue +-25 on a
0..255 circle, each with p = 0.5, in a random order, with OpenCV's saturating ``|x|`` arithmetic on
uint8, so a hue pushed below 0 folds back instead of wrapping). The official code converts to HSV
with OpenCV's uint8 routines; here the conversion is done in floating point and quantised to the
same uint8 grid, so a jittered pixel may differ by one level from OpenCV's (the fixtures do not pin
the data pipeline, README section 7).

Determinism: sample ``pos`` of the stream (``pos = iteration x global batch + slot``) is item
``permutation_epoch[pos mod N]`` augmented with ``numpy.random.default_rng([seed, pos])``
(:mod:`tag2mask.engine.data_stream`), so a resumed or multi-process run sees the batches of an
uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
from tag2mask.data.seg_augment import hsv_to_rgb, rgb_to_hsv
from tag2mask.methods.fma.config import AugmentSettings
from tag2mask.engine.data_stream import EpochOrder

__all__ = ["FMASource", "open_fma_data", "jitter_step", "color_jitter", "rescale_crop_flip", "augment", "FMACrops", "FMABatch",
           "collate", "IGNORE"]

IGNORE = 255


class FMASource(Protocol):
    """Indexable training images: ``load(i) -> (name, RGB uint8 (H, W, 3), label ids, seed or None)``."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> tuple[str, np.ndarray, list[int], Optional[np.ndarray]]: ...


class _SynthSource:
    """tag2mask's synthetic world; names are the ids ``tag2mask synth export`` writes (``train_000000``)."""

    def __init__(self, split: str, n: int, size: int) -> None:
        from tag2mask.synth import SyntheticDataset

        self.ds = SyntheticDataset(split, n, size)
        self.names = [self.ds.image_id(i) for i in range(len(self.ds))]

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int) -> tuple[str, np.ndarray, list[int], Optional[np.ndarray]]:
        s = self.ds[i]
        return self.names[i], s.image, [int(c) - 1 for c in s.labels], None  # scene ids are 1-based


class _DatasetSource:
    """A :mod:`tag2mask.data.datasets` data set (VOC, COCO, folder), decoded lazily."""

    def __init__(self, dataset: Any) -> None:
        self.ds = dataset
        self.names = list(dataset.names)

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int) -> tuple[str, np.ndarray, list[int], Optional[np.ndarray]]:
        from tag2mask.data.images import load_image_array

        s = self.ds[i]
        return s.name, load_image_array(s.image_path), list(s.label_ids), None


class _WithSeeds:
    """``source`` with the seed mask ``seed_dir/<name>.png`` of every image (checked when loaded)."""

    def __init__(self, source: Any, seed_dir: Path, num_fg: int) -> None:
        self.source, self.seed_dir, self.num_fg = source, seed_dir, num_fg
        missing = [n for n in source.names if not (seed_dir / f"{n}.png").is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(f"{seed_dir}: no seed mask for {len(missing)} of {len(source)} training images "
                                    f"({shown}); seeds are <name>.png as `tag2mask label --method fma` writes them")

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> tuple[str, np.ndarray, list[int], Optional[np.ndarray]]:
        from tag2mask.io.palette import read_label_png

        name, rgb, ids, _ = self.source.load(i)
        path = self.seed_dir / f"{name}.png"
        seed = read_label_png(path)
        if seed.shape != rgb.shape[:2]:
            raise ValueError(f"{path}: seed is {seed.shape[1]}x{seed.shape[0]} but its image is "
                             f"{rgb.shape[1]}x{rgb.shape[0]}")
        bad = np.unique(seed[(seed > self.num_fg) & (seed != IGNORE)])
        if bad.size:
            raise ValueError(f"{path}: seed values {bad[:8].tolist()} are not 0 (background), 1..{self.num_fg} "
                             f"(class id + 1) or {IGNORE}; wrong --classes?")
        return name, rgb, ids, seed


def _seed_folder(seeds: str | Path) -> Path:
    root = Path(seeds)
    if (root / "masks").is_dir() and (root / "run.json").is_file():
        return root / "masks"  # a `tag2mask label` / `tag2mask seed` run folder
    if not root.is_dir():
        raise FileNotFoundError(f"seed folder not found: {root}")
    return root


def open_fma_data(
    spec: str,
    split: str,
    class_names: Sequence[str],
    *,
    seeds: Optional[str | Path] = None,
    labels_file: Optional[str] = None,
    label_source: str = "dataset",
    synth_n: int = 64,
    synth_size: int = 224,
) -> FMASource:
    """Open the training images of ``spec``.

    Args:
        spec: ``synth``, a VOC root (labels from ``Annotations`` or the GT masks), a COCO root in
            the WSSS layout (``<split>.txt`` lines ``<id> <class id> ...``) or an image folder
            (``labels_file``: JSON / CSV image-level labels).
        split: VOC / COCO split, ``train`` for synth; ignored for folders.
        class_names: foreground names of the label files (label id = index).
        seeds: the segmentation stage's seed masks: a label run folder or a folder of PNGs.
        label_source: ``gt_mask`` (classes present in the GT mask: the official ``seg_cls_labels``)
            or ``dataset`` (VOC XML, COCO split lines, the folder's label file, synthetic scenes).
    """
    from tag2mask.data.datasets import COCODataset, FolderDataset, VOCDataset, detect_dataset

    if label_source not in ("gt_mask", "dataset"):
        raise ValueError(f"label_source must be 'gt_mask' or 'dataset', got {label_source!r}")
    from_mask = label_source == "gt_mask"
    if spec == "synth":
        source: Any = _SynthSource(split, synth_n, synth_size)
    else:
        kind = detect_dataset(spec)
        if kind == "voc":
            source = _DatasetSource(VOCDataset(spec, split, class_names, label_source="mask" if from_mask else "xml"))
        elif kind == "coco":
            split_file = split if split.endswith(".txt") else f"{split}.txt"
            source = _DatasetSource(COCODataset(spec, split_file, class_names,
                                                label_source="mask" if from_mask else "split"))
        elif kind == "folder":
            if labels_file is None and seeds is None:
                raise ValueError(f"{spec}: an image folder needs --labels (JSON/CSV image-level labels)")
            source = _DatasetSource(FolderDataset(spec, labels_file, class_names))
        else:
            raise FileNotFoundError(f"{spec}: not 'synth', a VOC/COCO root or an image folder")
    if len(source) == 0:
        raise ValueError(f"{spec}: no training images")
    if seeds is not None:
        source = _WithSeeds(source, _seed_folder(seeds), len(class_names))
    return source


# ------------------------------------------------------------------------------------------------
# augmentation


def _saturate(x: np.ndarray) -> np.ndarray:
    """OpenCV's ``convertScaleAbs`` rounding: ``saturate_cast<uchar>(|x|)`` (round half to even)."""
    return np.clip(np.rint(np.abs(x)), 0, 255)


JITTER_STEPS = ("brightness", "contrast", "saturation", "hue")


def jitter_step(rgb: np.ndarray, step: str, value: float) -> np.ndarray:
    """One colour-jitter step on RGB values 0..255 (float array, integral values) -> same shape.

    brightness ``|x + v|``, contrast ``|x * v|``, saturation ``|S * v|`` (S on 0..255), hue
    ``|H + v|`` (H on 0..255 for the whole circle), each saturated to 0..255 with OpenCV's rounding.
    """
    if step == "brightness":
        return _saturate(rgb + value)
    if step == "contrast":
        return _saturate(rgb * value)
    if step not in ("saturation", "hue"):
        raise ValueError(f"unknown jitter step {step!r}")
    hsv = rgb_to_hsv(rgb / 255.0)
    if step == "saturation":
        hsv[..., 1] = _saturate(np.rint(hsv[..., 1] * 255.0) * value) / 255.0
    else:
        h8 = np.rint(hsv[..., 0] * 256.0) % 256
        hsv[..., 0] = _saturate(h8 + value) / 256.0
    return _saturate(hsv_to_rgb(hsv) * 255.0)


def color_jitter(rgb: np.ndarray, rng: np.random.Generator, max_bright: float = 25.0,
                 contrast: tuple[float, float] = (0.6, 1.4), saturation: tuple[float, float] = (0.5, 1.5),
                 max_hue: float = 25.0, p: float = 0.5) -> np.ndarray:
    """AlchemyCat's ``RandColorJitter`` on an RGB uint8 image (see the module docstring): (H, W, 3) -> same.

    Draws, in this order: for brightness, contrast, saturation and hue whether to apply it (p) and
    its value; then the order of the four steps.
    """
    draws: list[Optional[float]] = []
    for low, high in ((-max_bright, max_bright), contrast, saturation, (-max_hue, max_hue)):
        draws.append(float(rng.uniform(low, high)) if rng.random() < p else None)
    order = rng.permutation(4)
    x = rgb.astype(np.float64)
    for step in order:
        if draws[step] is not None:
            x = jitter_step(x, JITTER_STEPS[step], draws[step])
    return x.astype(np.uint8)


def rescale_crop_flip(rgb: np.ndarray, seed: Optional[np.ndarray], rng: np.random.Generator,
                      settings: AugmentSettings) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Random rescale (``rand_range``), random crop, random flip: (H, W, 3) uint8 [+ (H, W) seed] -> crops."""
    h, w = rgb.shape[:2]
    lo, hi = settings.long_side
    target = lo + int(rng.integers(hi - lo + 1))
    ratio = max(target / max(h, w), settings.short_side_min / min(h, w))
    nh, nw = round(ratio * h), round(ratio * w)  # Python's round, as the official code
    if (nh, nw) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC))
        if seed is not None:
            seed = np.asarray(Image.fromarray(seed).resize((nw, nh), Image.NEAREST))
    c = settings.crop
    y0, x0 = int(rng.integers(0, nh - c + 1)), int(rng.integers(0, nw - c + 1))
    rgb = rgb[y0 : y0 + c, x0 : x0 + c]
    seed = None if seed is None else seed[y0 : y0 + c, x0 : x0 + c]
    if settings.hflip and rng.random() < 0.5:
        rgb = rgb[:, ::-1]
        seed = None if seed is None else seed[:, ::-1]
    return np.ascontiguousarray(rgb), None if seed is None else np.ascontiguousarray(seed)


def augment(rgb: np.ndarray, seed: Optional[np.ndarray], rng: np.random.Generator,
            settings: AugmentSettings) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The whole training augmentation: ``(3, crop, crop)`` float32 CLIP-normalised image and the
    ``(crop, crop)`` int64 seed crop (or None)."""
    if settings.color_jitter:
        rgb = color_jitter(rgb, rng)
    rgb, seed = rescale_crop_flip(rgb, seed, rng, settings)
    x = torch.from_numpy(rgb.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    image = ((x - mean) / std).contiguous()
    return image, None if seed is None else torch.from_numpy(seed.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# the stream


class FMACrops(torch.utils.data.Dataset):
    """Training crops indexed by stream position.

    ``crops[pos] -> (image (3, S, S) float32, labels (F,) int64 0/1, seed (S, S) int64 or empty, name)``.
    With ``labels_from_crop`` the positives are the classes present in the cropped seed (official
    ``ol_cls_lb``); otherwise the image-level labels (an image without labels but with a seed uses
    the classes of its whole seed).
    """

    def __init__(self, source: FMASource, settings: AugmentSettings, num_fg: int, seed: int,
                 labels_from_crop: bool = False) -> None:
        self.source, self.settings, self.num_fg = source, settings, int(num_fg)
        self.seed, self.labels_from_crop = int(seed), bool(labels_from_crop)
        self.order = EpochOrder(len(source), self.seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        name, rgb, ids, seed = self.source.load(self.order(pos))
        if self.labels_from_crop and seed is None:
            raise ValueError(f"{name}: labels from the crop need a seed mask")
        if not ids and seed is not None:
            ids = [int(v) - 1 for v in np.unique(seed) if 1 <= v <= self.num_fg]
        image, crop = augment(rgb, seed, np.random.default_rng([self.seed, int(pos)]), self.settings)
        labels = torch.zeros(self.num_fg, dtype=torch.int64)
        if self.labels_from_crop:
            present = torch.unique(crop)
            present = present[(present >= 1) & (present <= self.num_fg)]
            labels[present - 1] = 1
        else:
            bad = [i for i in ids if not 0 <= i < self.num_fg]
            if bad:
                raise ValueError(f"{name}: label ids {bad} outside the {self.num_fg} classes")
            labels[list(ids)] = 1
        return image, labels, crop if crop is not None else torch.zeros(0, dtype=torch.int64), name


class FMABatch(NamedTuple):
    """images (B, 3, S, S), labels (B, F) 0/1, seeds (B, S, S) int64 or None, names."""

    images: torch.Tensor
    labels: torch.Tensor
    seeds: Optional[torch.Tensor]
    names: list[str]

    def split(self, parts: int) -> list["FMABatch"]:
        """``parts`` consecutive sub-batches (gradient accumulation: the official ``sub_iter_num``)."""
        n = self.images.shape[0]
        if n % parts:
            raise ValueError(f"a batch of {n} cannot be split into {parts} equal sub-batches")
        k = n // parts
        return [FMABatch(self.images[i : i + k], self.labels[i : i + k],
                         None if self.seeds is None else self.seeds[i : i + k], self.names[i : i + k])
                for i in range(0, n, k)]


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]) -> FMABatch:
    seeds = [it[2] for it in items]
    return FMABatch(torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
                    torch.stack(seeds) if all(s.numel() for s in seeds) else None, [it[3] for it in items])
