"""Images paired with label maps, for training and scoring segmentation networks.

A :class:`SegmentationSource` is a list of ``(name, image file, mask file)`` pairs read lazily.
:func:`open_segmentation_data` builds one from

* a **VOC root** (``JPEGImages`` + ``ImageSets/Segmentation/<split>.txt``; masks from
  ``SegmentationClassAug`` for ``train_aug``, else ``SegmentationClass``);
* a **COCO root in VOC layout** (``JPEGImages``, ``SegmentationClass``, ``<split>.txt`` whose lines
  start with the image id);
* a **plain image folder** with a mask folder;
* any of these with a **pseudo-label folder** instead of the ground truth: palette PNGs
  (0 background, class id + 1, 255 ignore) exactly as ``tag2mask label`` writes them, given as the
  folder of PNGs or as the label run folder (its ``masks/``; its ``run.json`` also names the classes).

:func:`open_unlabeled_images` lists images without any mask (a teacher labels every pixel:
MaskCLIP+'s annotation-free training on web images).

Masks are matched to images by relative path without extension (``masks/sub/a.png`` ↔
``images/sub/a.jpg``, any image extension). Values must be class ids below ``num_classes`` or 255;
anything else is an error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from tag2mask.data.datasets import IMAGE_SUFFIXES, detect_dataset
from tag2mask.io.json_files import read_json

__all__ = ["SegItem", "SegmentationSource", "UnlabeledImages", "open_segmentation_data", "open_unlabeled_images",
           "pseudo_label_classes", "IGNORE"]

IGNORE = 255


@dataclass(frozen=True)
class SegItem:
    """One training / scoring pair: ``name`` (relative path without extension) and its files."""

    name: str
    image: Path
    mask: Path


class SegmentationSource:
    """Lazy ``(name, RGB uint8 (H, W, 3), mask uint8 (H, W))`` pairs."""

    def __init__(self, items: Sequence[SegItem], num_classes: Optional[int] = None, description: str = "") -> None:
        self.items = list(items)
        self.num_classes = num_classes
        self.description = description

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
        """Decode pair ``i``; the mask must match the image size and hold valid values."""
        from tag2mask.data.images import load_image_array
        from tag2mask.io.palette import read_label_png

        item = self.items[i]
        rgb = load_image_array(item.image)
        mask = read_label_png(item.mask)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"{item.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {item.image} is "
                             f"{rgb.shape[1]}x{rgb.shape[0]}")
        if self.num_classes is not None:
            bad = np.unique(mask[(mask >= self.num_classes) & (mask != IGNORE)])
            if bad.size:
                raise ValueError(f"{item.mask}: label values {bad[:8].tolist()} are not classes 0..{self.num_classes - 1} "
                                 f"or {IGNORE} (ignore); wrong --classes?")
        return item.name, rgb, mask


class UnlabeledImages(SegmentationSource):
    """Images without masks: ``load`` gives an all-zero mask and ``all_unlabeled`` tells trainers that
    every pixel is unlabelled (the mask carries no label, only the image size)."""

    all_unlabeled = True

    def load(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
        from tag2mask.data.images import load_image_array

        item = self.items[i]
        rgb = load_image_array(item.image)
        return item.name, rgb, np.zeros(rgb.shape[:2], np.uint8)


def open_unlabeled_images(data: Union[str, Path], split: Optional[str] = None) -> UnlabeledImages:
    """The images of a VOC/COCO split (``split`` as in :func:`open_segmentation_data`) or of an image folder."""
    data = Path(data)
    _, _, image_dir, images, names = _locate_images(data, split)
    if names is not None:
        missing = [n for n in names if n not in images]
        if missing:
            raise _missing("images", missing, image_dir)
    else:
        names = sorted(k for k, p in images.items() if p.relative_to(image_dir).with_suffix("").as_posix() == k)
    if not names:
        raise ValueError(f"no images in {image_dir}")
    return UnlabeledImages([SegItem(n, images[n], images[n]) for n in names], None, f"{image_dir} (no masks)")


def _locate_images(data: Path, split: Optional[str]) -> tuple[str, Path, Path, dict[str, Path], Optional[list[str]]]:
    """``(kind, root, image folder, {name: image path}, the split's names or None)`` of a data set.

    ``split`` (VOC/COCO only): a split name or a split file; ``None`` lists no names.
    """
    kind = detect_dataset(data)
    if kind is None:
        raise FileNotFoundError(f"{data}: not a VOC/COCO root or an image folder")
    root = data / "VOC2012" if kind == "voc" and not (data / "JPEGImages").is_dir() else data
    image_dir = root / "JPEGImages" if kind in ("voc", "coco") else data
    images = _index_files(image_dir, IMAGE_SUFFIXES)
    names: Optional[list[str]] = None
    if split is not None and kind in ("voc", "coco"):
        split_path = Path(split)
        if not split_path.is_file():
            split_path = (root / "ImageSets" / "Segmentation" / f"{split}.txt" if kind == "voc"
                          else root / (split if split.endswith(".txt") else f"{split}.txt"))
        names = _split_names(split_path)
    return kind, root, image_dir, images, names


def _split_names(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _index_files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """``relative path without extension -> file`` for every file with one of ``suffixes`` (recursive).

    Files in sub-folders are also found by their bare stem when it is unique (COCO keeps
    ``JPEGImages/train2014/<id>.jpg`` while split lists name ``<id>``).
    """
    out: dict[str, Path] = {}
    stems: dict[str, list[Path]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes:
            rel = p.relative_to(folder).with_suffix("").as_posix()
            out.setdefault(rel, p)
            if "/" in rel:
                stems.setdefault(p.stem, []).append(p)
    for stem, paths in stems.items():
        if stem not in out and len(paths) == 1:
            out[stem] = paths[0]
    return out


def _mask_folder(masks: Path) -> Path:
    if (masks / "masks").is_dir() and (masks / "run.json").is_file():
        return masks / "masks"  # a `tag2mask label` run folder
    if not masks.is_dir():
        raise FileNotFoundError(f"mask folder not found: {masks}")
    return masks


def pseudo_label_classes(masks: Union[str, Path]) -> Optional[list[str]]:
    """Foreground class names recorded by ``tag2mask label`` (its ``run.json``), or None."""
    masks = Path(masks)
    for run_json in (masks / "run.json", masks.parent / "run.json"):
        if run_json.is_file():
            try:
                record = read_json(run_json)
            except ValueError as exc:
                raise ValueError(f"unreadable run record: {exc}") from None
            classes = record.get("classes") if isinstance(record, dict) else None
            if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
                return classes
    return None


def _missing(kind: str, names: Sequence[str], where: Path) -> ValueError:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ValueError(f"{len(names)} {kind} missing in {where}: {', '.join(names[:5])}{more}")


def open_segmentation_data(
    data: Union[str, Path],
    split: Optional[str] = None,
    masks: Optional[Union[str, Path]] = None,
    num_classes: Optional[int] = None,
) -> SegmentationSource:
    """Pair images with masks (see the module docstring).

    Args:
        data: VOC root, COCO root (VOC layout) or image folder.
        split: VOC/COCO split name or split file; ``None`` for a folder (or: every mask of ``masks``).
        masks: pseudo-label / mask folder or ``tag2mask label`` run folder; ``None``: the data set's
            ground truth (VOC / COCO only).
        num_classes: checked against the mask values when pairs are loaded.
    """
    data = Path(data)
    kind, root, image_dir, images, names = _locate_images(data, split)
    if masks is not None:
        mask_dir = _mask_folder(Path(masks))
        description = f"{image_dir} with masks {mask_dir}"
    elif kind == "voc":
        aug, plain = root / "SegmentationClassAug", root / "SegmentationClass"
        order = (aug, plain) if split == "train_aug" else (plain, aug)
        found = [d for d in order if d.is_dir()]
        if not found:
            raise FileNotFoundError(f"{root}: no SegmentationClass(Aug) folder; pass --masks")
        mask_dir = found[0]
        description = f"VOC {split} ({mask_dir.name})"
    elif kind == "coco":
        mask_dir = root / "SegmentationClass"
        description = f"COCO {split} (SegmentationClass)"
    else:
        raise ValueError(f"{data}: an image folder needs a mask folder (--masks: ground truth or pseudo-labels)")
    mask_files = _index_files(mask_dir, (".png",))
    if names is None:
        listed, folder = (mask_files, mask_dir) if masks is not None or kind == "folder" else (images, image_dir)
        names = sorted(k for k, p in listed.items() if p.relative_to(folder).with_suffix("").as_posix() == k)
    missing_masks = [n for n in names if n not in mask_files]
    if missing_masks:
        raise _missing("masks", missing_masks, mask_dir)
    missing_images = [n for n in names if n not in images]
    if missing_images:
        raise _missing("images", missing_images, image_dir)
    if not names:
        raise ValueError(f"no image/mask pairs in {description}")
    items = [SegItem(n, images[n], mask_files[n]) for n in names]
    return SegmentationSource(items, num_classes, description)
