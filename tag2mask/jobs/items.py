"""What one item of a batch job ends as: its outputs, or an error record of a known kind.

Shared by the runner (:mod:`tag2mask.jobs.runner`) and the worker processes of overlapped jobs
(:mod:`tag2mask.jobs.overlap`): a worker turns its item's outcome into plain data
(:class:`FinishedItem` with the outputs already hashed, or :class:`ItemFailure`), and the runner
records it.
"""

from __future__ import annotations

import errno
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from tag2mask.io.manifest import file_sha256

__all__ = ["DiskFullError", "ItemError", "ItemOutput", "FinishedItem", "ItemFailure", "error_kind",
           "finished_item", "item_failure"]


class DiskFullError(OSError):
    """The disk (or the quota) is full: the job stops; finished items stay and ``--resume`` continues."""


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full_error(where: str, written: int) -> DiskFullError:
    err = DiskFullError(
        f"no space left on the device while writing {where}; the job stopped ({written} new items written, "
        f"finished items are kept). Free some space, then run the same command again with --resume"
    )
    err.errno = errno.ENOSPC
    err._where = where
    return err


def as_disk_full_error(exc: BaseException, out_dir: Path, written: int) -> Optional[DiskFullError]:
    """A :class:`DiskFullError` for ``exc`` (or something it was raised from) if it is ENOSPC/EDQUOT."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError):
            return exc
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            err = disk_full_error(exc.filename or exc.filename2 or f"the run folder {out_dir}", written)
            err.errno = exc.errno
            return err
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class ItemError(Exception):
    """Raise from ``process_fn`` for an expected, clearly explained per-item failure."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ItemOutput:
    """What ``process_fn`` may return instead of a bare path list: outputs plus record fields."""

    outputs: Sequence[Union[str, Path]]
    info: dict[str, Any] = field(default_factory=dict)


def error_kind(exc: BaseException, default: str = "internal") -> str:
    """A short machine-readable category for a per-item exception (``default`` when unknown)."""
    if isinstance(exc, ItemError):
        return exc.kind
    from tag2mask.data.images import ImageDecodeError
    from tag2mask.data.tag_files import LabelFileError

    if isinstance(exc, ImageDecodeError):
        return "decode"
    if isinstance(exc, LabelFileError):
        return "labels"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out_of_memory"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return default


def error_message(exc: BaseException) -> str:
    # our own errors already name the file and the problem; others get their type for context
    if isinstance(exc, ItemError) or error_kind(exc) in ("decode", "labels"):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _relative(path: Union[str, Path], out_dir: Path) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(p)  # outside the run folder: keep it absolute


@dataclass
class FinishedItem:
    """What one item left behind, ready for its manifest line (made where the item finished).

    ``outputs`` are relative to the run folder; sizes and SHA-256 are read back from the files.
    """

    outputs: list[str]
    sizes: list[int]
    hashes: list[str]
    info: dict[str, Any]


def finished_item(result: Any, out_dir: Path) -> FinishedItem:
    """Turn what a process function returned (paths or :class:`ItemOutput`) into a :class:`FinishedItem`."""
    if not isinstance(result, ItemOutput):
        result = ItemOutput(list(result))
    outputs = [Path(p) for p in result.outputs]
    return FinishedItem([_relative(p, out_dir) for p in outputs], [p.stat().st_size for p in outputs],
                        [file_sha256(p) for p in outputs], dict(result.info))


@dataclass
class ItemFailure:
    """A per-item exception as plain data (it crosses process boundaries).

    ``disk_full`` holds the file being written when the disk or quota filled up (the job must stop).
    """

    kind: str
    message: str
    traceback: Optional[str] = None
    disk_full: Optional[str] = None


def item_failure(exc: BaseException, out_dir: Path, default_kind: str = "internal") -> ItemFailure:
    """Describe ``exc`` raised while processing an item (call inside the ``except`` block)."""
    full = as_disk_full_error(exc, out_dir, 0)
    if full is not None:
        where = getattr(full, "_where", None) or f"the run folder {out_dir}"
        return ItemFailure("disk_full", str(full), disk_full=where)
    kind = error_kind(exc, default=default_kind)
    trace = traceback.format_exc(limit=8) if kind == "internal" else None
    return ItemFailure(kind, error_message(exc), trace)


def release_cuda_memory(kind: str) -> None:
    """After a CUDA out-of-memory error, give cached blocks back so the next item can run."""
    if kind != "out_of_memory":
        return
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort only
        pass


