"""Image-level label files for a plain folder of images.

Two formats:

* JSON: an object ``{"image file name": ["class", ...], ...}``;
* CSV: header ``image,labels``, then one row per image, class names separated by ``;``
  (``cat;dog``), an empty cell meaning "no label".

Image names are paths *relative to the image folder*; absolute paths, ``..`` components or
anything resolving (through symlinks too) outside the folder are refused for that item.
Class names are matched case-insensitively, ignoring spaces, ``_`` and ``-`` (``potted plant`` =
``pottedplant``), and the official COCO / VOC spellings of the same class are accepted for each other
(``airplane``/``aeroplane``, ``motorcycle``/``motorbike``, ``couch``/``sofa``, ``tv``/``tvmonitor``,
``hair dryer``/``hair drier``); unknown names raise an error that lists the valid ones. Repeated names in one list are dropped, keeping the first
appearance order (CAM outputs are stored in label order).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "LabelFileError",
    "read_labels_file",
    "dedupe",
    "names_to_ids",
    "unknown_class_names",
    "safe_image_path",
    "safe_image_name",
]


class LabelFileError(ValueError):
    """A label file (or one of its entries) is invalid; the message names file and entry."""


def dedupe(items: Iterable[str]) -> list[str]:
    """Drop repeated items, keeping the order of first appearance."""
    seen: set[str] = set()
    out: list[str] = []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _read_json(path: Path) -> dict[str, list[str]]:
    def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                # json.loads would silently keep the last one; a tag file listing an image twice is a mistake
                raise LabelFileError(f"{path}: image {key!r} is listed more than once")
            seen[key] = value
        return seen

    from tag2mask.io.json_files import JSONFileError, loads_named

    try:
        data = loads_named(_read_utf8(path), path, object_pairs_hook=no_duplicate_keys)
    except JSONFileError as exc:
        raise LabelFileError(str(exc)) from None
    if not isinstance(data, dict):
        raise LabelFileError(f"{path}: expected a JSON object {{\"image\": [\"class\", ...]}}, got {type(data).__name__}")
    out: dict[str, list[str]] = {}
    for name, labels in data.items():
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise LabelFileError(f"{path}: entry {name!r}: labels must be a list of class-name strings, got {labels!r}")
        out[name] = dedupe(x.strip() for x in labels if x.strip())
    return out


def _read_utf8(path: Path) -> str:
    """The file's text (UTF-8, an optional BOM dropped); other encodings are an error naming the file."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LabelFileError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                             "save the file as UTF-8") from None


def _read_csv(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with io.StringIO(_read_utf8(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "labels"] or len(header) != 2:
            raise LabelFileError(f"{path}: CSV header must be 'image,labels', got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            if len(row) != 2:
                raise LabelFileError(f"{path}:{lineno}: expected 2 columns (image,labels), got {len(row)}: {row!r}")
            name, cell = row[0].strip(), row[1]
            if not name:
                raise LabelFileError(f"{path}:{lineno}: empty image name")
            if name in out:
                raise LabelFileError(f"{path}:{lineno}: image {name!r} listed twice")
            out[name] = dedupe(x.strip() for x in cell.split(";") if x.strip())
    return out


def read_labels_file(path: str | Path) -> dict[str, list[str]]:
    """Parse a ``.json`` or ``.csv`` label file into ``{image name: [class name, ...]}``.

    Names are not validated here (see :func:`names_to_ids`, :func:`safe_image_path`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise LabelFileError(f"{path}: unknown label file type {suffix!r}; use .json or .csv")


# COCO's official category names and the VOC-style ones CLIP-ES uses for the same classes: label files
# exported from COCO annotations say "motorcycle", the class lists say "motorbike".
_SPELLING_VARIANTS: tuple[tuple[str, ...], ...] = (
    ("aeroplane", "airplane"), ("motorbike", "motorcycle"), ("sofa", "couch"), ("tvmonitor", "tv"),
    ("hairdrier", "hairdryer"),
)


def _name_key(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch not in " _-")


def _class_index(class_names: Sequence[str]) -> dict[str, int]:
    """Name key -> class id, with the other spellings of a class added where they name no class."""
    index: dict[str, int] = {}
    for i, n in enumerate(class_names):
        index.setdefault(_name_key(n), i)
    for variants in _SPELLING_VARIANTS:
        ids = [index[v] for v in variants if v in index]
        if ids:
            for v in variants:
                index.setdefault(v, ids[0])
    return index


def names_to_ids(labels: Sequence[str], class_names: Sequence[str], where: str = "") -> list[int]:
    """Map class names to 0-based ids into ``class_names`` (first-appearance order, no repeats).

    Raises:
        LabelFileError: an unknown name; the message lists the valid names.
    """
    index = _class_index(class_names)
    ids: list[int] = []
    for name in labels:
        key = _name_key(name)
        if key not in index:
            prefix = f"{where}: " if where else ""
            raise LabelFileError(
                f"{prefix}unknown class name {name!r}; valid names are: {', '.join(class_names)}")
        if index[key] not in ids:
            ids.append(index[key])
    return ids


def unknown_class_names(labels: Mapping[str, Sequence[str]], class_names: Sequence[str]) -> dict[str, list[str]]:
    """``{unknown name: [images using it]}`` for the names of ``labels`` that ``class_names`` lacks.

    Matching is the same as :func:`names_to_ids` (stripped, case-insensitive), so a command can
    tell up front that a whole label file uses another vocabulary instead of failing image by image.
    """
    known = _class_index(class_names)
    unknown: dict[str, list[str]] = {}
    for image, names in labels.items():
        for name in dedupe(n.strip() for n in names):
            if name and _name_key(name) not in known:
                unknown.setdefault(name, []).append(image)
    return unknown


def safe_image_name(image_dir: Any, name: str, where: str = "") -> str:
    """``name`` as a POSIX path relative to ``image_dir`` (a folder or a URI prefix), checked by its text alone.

    Raises:
        LabelFileError: invalid or over-long name, absolute path, drive letter or a ``..`` component.
    """
    from tag2mask.io.paths import checked_name

    if isinstance(name, str) and ".." in PurePosixPath(name.replace("\\", "/")).parts:
        prefix = f"{where}: " if where else ""
        raise LabelFileError(f"{prefix}image name {name!r} points outside the image folder {image_dir} ('..')")
    return checked_name(image_dir, name, where, error=LabelFileError)


def safe_image_path(image_dir: str | Path, name: str, where: str = "") -> Path:
    """Resolve ``name`` inside ``image_dir``, refusing anything that escapes it.

    Raises:
        LabelFileError: what :func:`safe_image_name` refuses, or a path (or symlink) resolving outside
            ``image_dir``.
    """
    from tag2mask.io.paths import path_inside

    safe_image_name(image_dir, name, where)
    return path_inside(image_dir, name, where, error=LabelFileError, must_be_relative=True)
