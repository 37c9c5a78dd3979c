"""Data sets readable by every command: VOC 2012, COCO 2014 (VOC-style layout), plain folders.

Every data set is a lazy sequence of :class:`Sample` records (paths + image-level label ids);
nothing is decoded while iterating, so a command streams over images one at a time.
Label ids are 0-based into the foreground ``class_names`` passed in (VOC: 20 names), i.e.
ground-truth mask value ``id + 1``; the same convention as the ``keys`` of CAM files.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Sequence

import numpy as np

from tag2mask.data.tag_files import (LabelFileError, dedupe, names_to_ids, read_labels_file, safe_image_name,
                                      safe_image_path)

__all__ = [
    "Sample",
    "VOCDataset",
    "COCODataset",
    "FolderDataset",
    "UriFolderDataset",
    "open_image_folder",
    "DATASETS",
    "open_dataset",
    "detect_dataset",
    "labels_from_mask",
    "labels_from_xml",
    "xml_object_names",
    "IMAGE_SUFFIXES",
    "find_image",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Sample:
    """One image: ``name`` (file stem / id), its path, 0-based label ids, optional GT mask path."""

    name: str
    image_path: Path
    label_ids: list[int]
    gt_path: Path | None = None


def xml_object_names(path: str | Path) -> list[str]:
    """The ``<object><name>`` entries of a VOC annotation, first-appearance order, no repeats."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"{path}: cannot parse VOC annotation XML ({exc})") from exc
    return dedupe(n for n in ((obj.findtext("name") or "").strip() for obj in root.iter("object")) if n)


def labels_from_xml(path: str | Path, class_names: Sequence[str]) -> list[int]:
    """Label ids from a VOC annotation: every ``<object><name>``, first-appearance order, no repeats."""
    return names_to_ids(xml_object_names(path), class_names, where=str(path))


def labels_from_mask(path: str | Path, num_fg: int) -> list[int]:
    """Label ids from a GT mask: values ``1..num_fg`` present, ascending (0 and 255 skipped)."""
    from tag2mask.io.palette import read_label_png  # local import: io depends on nothing in data

    mask = read_label_png(path)
    vals = np.unique(mask)
    bad = vals[(vals > num_fg) & (vals != 255)]
    if bad.size:
        raise ValueError(f"{path}: mask values {bad.tolist()} exceed the {num_fg} foreground classes")
    return [int(v) - 1 for v in vals if 1 <= v <= num_fg]


def _read_split(path: Path) -> list[str]:
    if not path.is_file():
        others = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        hint = f"; splits there: {', '.join(others)}" if others else ""
        raise FileNotFoundError(f"split file not found: {path}{hint}")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def find_image(folder: Path, stem: str) -> Path:
    """``folder/<stem>.<ext>`` for the first image extension that exists.

    VOC-layout folders are not always JPEG: ``tag2mask synth export`` writes lossless PNGs into
    ``JPEGImages/``, and converted data sets often do the same. ``.jpg`` is tried first (VOC, COCO),
    then the other :data:`IMAGE_SUFFIXES`, lower then upper case. When none exists the ``.jpg`` path
    is returned, so the decoder's "file not found" names the file a VOC user expects.
    """
    for suffix in IMAGE_SUFFIXES:
        for candidate in (suffix, suffix.upper()):
            p = folder / f"{stem}{candidate}"
            if p.is_file():
                return p
    return folder / f"{stem}.jpg"


class _Base:
    """Shared lazy-sequence behaviour; subclasses set ``self._names`` and ``_make(i)``."""

    _names: list[str]

    @property
    def names(self) -> list[str]:
        """Item names (file stems / ids) in iteration order, without loading anything."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int) -> Sample:
        return self._make(i)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self._names)):
            yield self._make(i)

    def _make(self, i: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError


class VOCDataset(_Base):
    """PASCAL VOC 2012: ``JPEGImages``, ``Annotations``, ``SegmentationClass[Aug]``, split files.

    Args:
        root: the ``VOC2012`` folder (or a ``VOCdevkit`` containing it).
        split: ``train``, ``train_aug``, ``val`` ... read from ``ImageSets/Segmentation/<split>.txt``.
        class_names: the 20 foreground names, in VOC order.
        label_source: ``"xml"`` (default; ``Annotations/<name>.xml``) or ``"mask"`` (GT mask values).
    """

    def __init__(self, root: str | Path, split: str = "train", class_names: Sequence[str] = (),
                 label_source: str = "xml") -> None:
        root = Path(root)
        if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
            root = root / "VOC2012"
        if not (root / "JPEGImages").is_dir():
            raise FileNotFoundError(f"{root}: not a VOC root (no JPEGImages folder)")
        if not class_names:
            raise ValueError("VOCDataset needs class_names (the 20 VOC foreground names)")
        if label_source not in ("xml", "mask"):
            raise ValueError(f"label_source must be 'xml' or 'mask', got {label_source!r}")
        self.root, self.split, self.class_names, self.label_source = root, split, list(class_names), label_source
        self._names = _read_split(root / "ImageSets" / "Segmentation" / f"{split}.txt")
        # SegmentationClassAug holds the 10,582 train_aug masks; plain splits use SegmentationClass
        aug, plain = root / "SegmentationClassAug", root / "SegmentationClass"
        self.gt_dirs = [d for d in ((aug, plain) if split == "train_aug" else (plain, aug)) if d.is_dir()]

    def _gt(self, name: str) -> Path | None:
        for d in self.gt_dirs:
            if (d / f"{name}.png").is_file():
                return d / f"{name}.png"
        return None

    def _make(self, i: int) -> Sample:
        name = self._names[i]
        gt = self._gt(name)
        if self.label_source == "xml":
            ids = labels_from_xml(self.root / "Annotations" / f"{name}.xml", self.class_names)
        else:
            if gt is None:
                raise FileNotFoundError(f"{name}: no GT mask in {[str(d) for d in self.gt_dirs]} for mask labels")
            ids = labels_from_mask(gt, len(self.class_names))
        return Sample(name, find_image(self.root / "JPEGImages", name), ids, gt)


class COCODataset(_Base):
    """COCO 2014 in the VOC-style layout of the CLIP-ES / WeCLIP repos.

    Split lines are ``<image id> <cls0> <cls1> ...`` with class ids 0-based into the 80 names;
    a line with only the id means "labels from the mask" (or no label if ``label_source``
    is ``"split"`` and no mask exists).

    Args:
        root: folder with ``JPEGImages`` and ``SegmentationClass``.
        split_file: path of the split list (absolute, or relative to ``root``).
        class_names: the 80 COCO names.
        label_source: ``"split"`` (default) or ``"mask"``.
    """

    def __init__(self, root: str | Path, split_file: str | Path, class_names: Sequence[str] = (),
                 label_source: str = "split", image_dir: str = "JPEGImages",
                 gt_dir: str = "SegmentationClass") -> None:
        root = Path(root)
        if not class_names:
            raise ValueError("COCODataset needs class_names (the 80 COCO names)")
        if label_source not in ("split", "mask"):
            raise ValueError(f"label_source must be 'split' or 'mask', got {label_source!r}")
        split_path = Path(split_file)
        if not split_path.is_absolute() and not split_path.is_file():
            split_path = root / split_path
        self.root, self.class_names, self.label_source = root, list(class_names), label_source
        self.image_dir, self.gt_dir = root / image_dir, root / gt_dir
        self._names, self._ids = [], []
        n = len(self.class_names)
        if not split_path.is_file():
            raise FileNotFoundError(f"split file not found: {split_file}")
        for lineno, line in enumerate(split_path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                ids = [int(x) for x in parts[1:]]
            except ValueError as exc:
                raise ValueError(f"{split_path}:{lineno}: class ids must be integers ({exc})") from exc
            bad = [x for x in ids if not 0 <= x < n]
            if bad:
                raise ValueError(f"{split_path}:{lineno}: class ids {bad} outside [0, {n})")
            self._names.append(parts[0])
            self._ids.append(list(dict.fromkeys(ids)))

    def _make(self, i: int) -> Sample:
        name = self._names[i]
        gt = self.gt_dir / f"{name}.png"
        gt_path = gt if gt.is_file() else None
        if self.label_source == "mask":
            if gt_path is None:
                raise FileNotFoundError(f"{name}: GT mask {gt} not found for mask labels")
            ids = labels_from_mask(gt_path, len(self.class_names))
        else:
            ids = list(self._ids[i])
        return Sample(name, find_image(self.image_dir, name), ids, gt_path)


class FolderDataset(_Base):
    """A folder of images with an optional JSON/CSV label file and optional GT folder.

    Args:
        image_dir: the image folder.
        labels_file: ``.json`` / ``.csv`` (see :mod:`tag2mask.data.tag_files`); ``None`` lists every
            image in ``image_dir`` (sorted, no labels).
        class_names: valid names (required with a label file).
        gt_dir: optional folder of ``<stem>.png`` GT masks.
        strict: raise on the first bad entry (default); otherwise skip bad entries and record
            ``(entry, message)`` in ``self.errors``.
    """

    def __init__(self, image_dir: str | Path, labels_file: str | Path | None = None,
                 class_names: Sequence[str] = (), gt_dir: str | Path | None = None,
                 strict: bool = True) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.class_names = list(class_names)
        self.gt_dir = Path(gt_dir) if gt_dir is not None else None
        self.errors: list[tuple[str, str]] = []
        self._paths: list[Path] = []
        self._ids: list[list[int]] = []
        self._names = []
        if labels_file is None:
            for p in sorted(self.image_dir.rglob("*")):
                # every entry named like an image is an item, even a folder, a FIFO or a broken link:
                # it then fails to decode and is reported in the manifest instead of silently skipped
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    self._add(p.relative_to(self.image_dir).with_suffix("").as_posix(), p, [])
            return
        if not self.class_names:
            raise ValueError("FolderDataset with a labels file needs class_names")
        for entry, names in read_labels_file(labels_file).items():
            where = f"{labels_file}: entry {entry!r}"
            try:
                path = safe_image_path(self.image_dir, entry, str(labels_file))
                ids = names_to_ids(names, self.class_names, where)
            except LabelFileError as exc:
                if strict:
                    raise
                self.errors.append((entry, str(exc)))
                continue
            self._add(PurePosixPath(entry.replace("\\", "/")).with_suffix("").as_posix(), path, ids)

    def _add(self, name: str, path: Path, ids: list[int]) -> None:
        self._names.append(name)
        self._paths.append(path)
        self._ids.append(ids)

    def _make(self, i: int) -> Sample:
        name = self._names[i]
        gt = None
        if self.gt_dir is not None and (self.gt_dir / f"{name}.png").is_file():
            gt = self.gt_dir / f"{name}.png"
        return Sample(name, self._paths[i], list(self._ids[i]), gt)


class UriFolderDataset(FolderDataset):
    """:class:`FolderDataset` of a URI prefix (``s3://bucket/prefix``, ``gs://...``, ``file:///...``): the
    same items, names and label rules, listed (recursively) and read through ``pyarrow.fs``
    (:mod:`tag2mask.io.uri_inputs`). ``image_dir`` is the URI (a string); each sample's ``image_path`` a
    :class:`~tag2mask.io.uri_inputs.RemoteFile`. A label-file entry missing from the listing stays an item
    whose read fails (a ``decode`` error record, as a missing local file)."""

    def __init__(self, uri: str, labels_file: str | Path | None = None, class_names: Sequence[str] = (),
                 strict: bool = True) -> None:
        from tag2mask.io.uri_inputs import RemoteFile, list_uri

        self.image_dir = uri.rstrip("/")
        self.class_names = list(class_names)
        self.gt_dir = None
        self.errors: list[tuple[str, str]] = []
        self._paths, self._ids, self._names = [], [], []
        start = len(self.image_dir) + 1
        listed = {f.uri[start:]: f for f in list_uri(uri, None if labels_file else IMAGE_SUFFIXES, recursive=True)}
        if labels_file is None:
            for rel, f in listed.items():  # sorted by key, as rglob lists a local folder
                self._add(PurePosixPath(rel).with_suffix("").as_posix(), f, [])
            return
        if not self.class_names:
            raise ValueError("UriFolderDataset with a labels file needs class_names")
        for entry, names in read_labels_file(labels_file).items():
            where = f"{labels_file}: entry {entry!r}"
            try:
                rel = safe_image_name(self.image_dir, entry, str(labels_file))
                ids = names_to_ids(names, self.class_names, where)
            except LabelFileError as exc:
                if strict:
                    raise
                self.errors.append((entry, str(exc)))
                continue
            item = listed.get(rel, RemoteFile(f"{self.image_dir}/{rel}"))
            self._add(PurePosixPath(rel).with_suffix("").as_posix(), item, ids)


def open_image_folder(image_dir: str | Path, labels_file: str | Path | None = None, class_names: Sequence[str] = (),
                      strict: bool = True) -> FolderDataset:
    """A :class:`FolderDataset`, or a :class:`UriFolderDataset` when ``image_dir`` is a URI (``s3://``, ...)."""
    from tag2mask.io.uri_inputs import is_uri

    if is_uri(str(image_dir)):
        return UriFolderDataset(str(image_dir), labels_file, class_names, strict=strict)
    return FolderDataset(image_dir, labels_file, class_names, strict=strict)


DATASETS: dict[str, Callable[..., _Base]] = {
    "voc": VOCDataset,
    "coco": COCODataset,
    "folder": FolderDataset,
}


def open_dataset(kind: str, **kwargs) -> _Base:
    """Build a data set by registry name (``voc``, ``coco``, ``folder``)."""
    try:
        cls = DATASETS[kind]
    except KeyError:
        raise ValueError(f"unknown data set kind {kind!r}; known: {', '.join(sorted(DATASETS))}") from None
    return cls(**kwargs)


def detect_dataset(path: str | Path) -> str | None:
    """Guess the layout: ``"voc"`` (JPEGImages + Annotations, also under ``VOC2012/``),
    ``"coco"`` (JPEGImages + SegmentationClass, no Annotations), ``"folder"`` (contains image
    files), else ``None``."""
    path = Path(path)
    for root in (path, path / "VOC2012"):
        if (root / "JPEGImages").is_dir() and (root / "Annotations").is_dir():
            return "voc"
    if (path / "JPEGImages").is_dir() and (path / "SegmentationClass").is_dir():
        return "coco"
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
        return "folder"
    return None
