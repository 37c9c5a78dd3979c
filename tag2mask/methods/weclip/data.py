"""WeCLIP training / validation data: image sources, the official crop augmentation, deterministic sampling.

Augmentation (official ``VOC12ClsDataset`` with ``aug=True``, in this order): random rescale by
``r ~ U(0.5, 2.0)`` (PIL bilinear to ``(int(r·w), int(r·h))``), horizontal flip with p = 0.5,
zero-pad (black RGB) to at least ``crop × crop`` at a random offset, random ``crop × crop`` window,
then per-channel normalisation. Colour jitter and ``resize_range`` are disabled there and here.

Image-level labels are those of the full image (a crop may miss a labelled object, as in the
official code) and come from ``label_source`` (``WeCLIPConfig.label_source``): ``gt_mask`` = the
classes present in the image's ground-truth mask, as the released code reads them
(``np.unique`` of ``SegmentationClassAug/<name>.png``; the VOC and COCO presets), or ``dataset`` =
the data set's own labels (VOC XML annotations, COCO split lists, a folder's label file, the
synthetic scene labels).

Determinism: sample ``pos`` of the training stream (``pos = iteration · global_batch + slot``) is
image ``perm_epoch[pos mod N]`` augmented with ``np.random.default_rng([seed, pos])``
(:mod:`tag2mask.engine.data_stream`). Nothing depends on worker processes, world size or earlier
samples, so a resumed or multi-process run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from tag2mask.methods.weclip.model import normalize_rgb
from tag2mask.engine.data_stream import EpochOrder, PositionSampler

__all__ = [
    "ImageSource",
    "SynthImages",
    "DatasetImages",
    "open_images",
    "augment_crop",
    "WeCLIPTrainSet",
    "TrainBatch",
    "collate_train",
    "PositionSampler",
]


class ImageSource(Protocol):
    """Indexable images with image-level labels (0-based foreground ids) and optional GT masks."""

    def __len__(self) -> int: ...

    def item(self, i: int) -> tuple[str, np.ndarray, list[int]]:
        """``(name, RGB uint8 (H, W, 3), label ids)``."""
        ...

    def gt(self, i: int) -> Optional[np.ndarray]:
        """``(H, W)`` uint8 GT mask (0 bg, id + 1, 255 ignore) or ``None``."""
        ...


class SynthImages:
    """tag2mask's synthetic world (labels = the scene's object classes; masks for validation)."""

    def __init__(self, split: str, n: int, size: int, base_seed: int = 0) -> None:
        from tag2mask.synth import SyntheticDataset

        self.ds = SyntheticDataset(split, n, size, base_seed=base_seed)

    def __len__(self) -> int:
        return len(self.ds)

    def item(self, i: int) -> tuple[str, np.ndarray, list[int]]:
        s = self.ds[i]
        return self.ds.image_id(i), s.image, [int(c) - 1 for c in s.labels]  # scene ids are 1-based

    def gt(self, i: int) -> Optional[np.ndarray]:
        return self.ds[i].mask


class DatasetImages:
    """Adapter for :mod:`tag2mask.data.datasets` (VOC, COCO, folder): decodes lazily."""

    def __init__(self, dataset: Any) -> None:
        self.ds = dataset

    def __len__(self) -> int:
        return len(self.ds)

    def item(self, i: int) -> tuple[str, np.ndarray, list[int]]:
        from tag2mask.data.images import load_image

        s = self.ds[i]
        return s.name, np.asarray(load_image(s.image_path), dtype=np.uint8), list(s.label_ids)

    def gt(self, i: int) -> Optional[np.ndarray]:
        from tag2mask.io.palette import read_label_png

        s = self.ds[i]
        return read_label_png(s.gt_path) if s.gt_path is not None else None


def open_images(
    spec: str,
    split: str,
    class_names: Sequence[str],
    *,
    labels_file: Optional[str] = None,
    synth_n: int = 64,
    synth_size: int = 160,
    label_source: str = "dataset",
) -> ImageSource:
    """Open a training or validation source.

    Args:
        spec: ``synth`` or a data set folder: a VOC root (``JPEGImages`` + ``Annotations``; labels
            from the XML), a COCO root in the WSSS layout (``<split>.txt`` lists with class ids), or a
            plain image folder with ``labels_file``.
        split: ``train_aug`` / ``train`` / ``val`` (VOC), a split file name or path (COCO),
            ``train`` / ``val`` (synth); ignored for folders.
        class_names: foreground names (VOC/COCO order) used to read labels.
        labels_file: JSON/CSV labels of a plain folder.
        synth_n, synth_size: number and size of synthetic images.
        label_source: ``gt_mask`` (labels = classes in the GT mask, the released code) or ``dataset``.
    """
    from tag2mask.data.datasets import COCODataset, FolderDataset, VOCDataset, detect_dataset

    if label_source not in ("gt_mask", "dataset"):
        raise ValueError(f"label_source must be 'gt_mask' or 'dataset', got {label_source!r}")
    from_mask = label_source == "gt_mask"
    if spec == "synth":  # scene labels are exactly the classes drawn in its mask
        return SynthImages("val" if split == "val" else "train", synth_n, synth_size)
    kind = detect_dataset(spec)
    if kind == "voc":
        return DatasetImages(VOCDataset(spec, split, class_names, label_source="mask" if from_mask else "xml"))
    if kind == "coco":
        split_file = split if split.endswith(".txt") else f"{split}.txt"
        return DatasetImages(COCODataset(spec, split_file, class_names, label_source="mask" if from_mask else "split"))
    if kind == "folder":
        if from_mask:
            raise ValueError(f"{spec}: a plain image folder has no ground-truth masks to read labels from; "
                             "use label_source='dataset' (its --labels file)")
        if labels_file is None:
            raise ValueError(f"{spec}: a plain image folder needs --labels (JSON/CSV image-level labels)")
        gt_dir = Path(spec).parent / "SegmentationClass"
        return DatasetImages(FolderDataset(spec, labels_file, class_names, gt_dir=gt_dir if gt_dir.is_dir() else None))
    raise FileNotFoundError(f"{spec}: not a VOC/COCO root or an image folder")


def augment_crop(
    rgb: np.ndarray,
    rng: np.random.Generator,
    crop: int,
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: bool = True,
) -> np.ndarray:
    """Official training augmentation on one RGB uint8 image ``(H, W, 3)`` → ``(crop, crop, 3)`` uint8."""
    h, w = rgb.shape[:2]
    lo, hi = scale_range
    if (lo, hi) != (1.0, 1.0):
        r = rng.uniform(lo, hi)
        size = (max(1, int(r * w)), max(1, int(r * h)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, resample=Image.BILINEAR))
    if hflip and rng.random() > 0.5:
        rgb = rgb[:, ::-1]
    h, w = rgb.shape[:2]
    big_h, big_w = max(crop, h), max(crop, w)
    canvas = np.zeros((big_h, big_w, 3), dtype=np.uint8)  # black padding, also labelled later (as official)
    top, left = int(rng.integers(big_h - h + 1)), int(rng.integers(big_w - w + 1))
    canvas[top : top + h, left : left + w] = rgb
    y0, x0 = int(rng.integers(big_h - crop + 1)), int(rng.integers(big_w - crop + 1))
    return np.ascontiguousarray(canvas[y0 : y0 + crop, x0 : x0 + crop])


class WeCLIPTrainSet(torch.utils.data.Dataset):
    """Map-style dataset indexed by *stream position* (see the module docstring).

    ``ds[pos]`` → ``(image (3, crop, crop) float32 normalised, label ids, name, pos)``.
    """

    def __init__(
        self,
        source: ImageSource,
        crop: int,
        *,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: bool = True,
        normalization: str = "imagenet",
        seed: int = 1,
    ) -> None:
        if len(source) == 0:
            raise ValueError("the training set is empty")
        self.source, self.crop = source, int(crop)
        self.scale_range, self.hflip = tuple(scale_range), bool(hflip)
        self.normalization, self.seed = normalization, int(seed)
        self._order = EpochOrder(len(source), self.seed)

    def __len__(self) -> int:
        return len(self.source)

    def index_at(self, pos: int) -> int:
        """Image index of stream position ``pos`` (a fresh seeded permutation every epoch)."""
        return self._order(pos)

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, list[int], str, int]:
        name, rgb, ids = self.source.item(self.index_at(pos))
        rng = np.random.default_rng([self.seed, int(pos)])
        crop = augment_crop(rgb, rng, self.crop, self.scale_range, self.hflip)
        return normalize_rgb(crop, self.normalization), ids, name, int(pos)


class TrainBatch(NamedTuple):
    """``images (B, 3, S, S)``, per-image label ids, names and stream positions."""

    images: torch.Tensor
    label_ids: list[list[int]]
    names: list[str]
    positions: list[int]


def collate_train(items: Sequence[tuple[torch.Tensor, list[int], str, int]]) -> TrainBatch:
    """Stack images; keep the variable-length label lists as lists."""
    return TrainBatch(
        torch.stack([it[0] for it in items]), [list(it[1]) for it in items],
        [it[2] for it in items], [it[3] for it in items],
    )
