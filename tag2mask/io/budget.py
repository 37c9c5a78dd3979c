"""Budget checks made *before* anything is allocated or decompressed from a user's file.

A small file must not make tag2mask allocate gigabytes before refusing it. The rule: sizes and
shapes read from a file are checked against what the file itself can hold (its own byte size, the
bytes its tensors are stored in), against the image they belong to, or against a documented
maximum, before an array is built or a zip member inflated; every zip member is read with a
compression-ratio check. The limits are listed in ``docs/security.md``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping, Union

__all__ = ["BudgetError", "MAX_COMPRESSION_RATIO", "MAX_ARRAY_BYTES", "check_zip_member", "npz_headers",
           "check_tensor_storage"]

#: a zip member inflating more than this many times its stored size is refused (zip bombs)
MAX_COMPRESSION_RATIO = 100
#: largest array read from an ``.npz`` (CAMs and other arrays): 1 GiB uncompressed
MAX_ARRAY_BYTES = 1 << 30
#: a member's compressed size below which the ratio is not judged (tiny headers compress well)
_RATIO_FLOOR = 4096


class BudgetError(ValueError):
    """A file that asks for more memory than it can justify; the message names the file and the limit."""


def check_zip_member(info: zipfile.ZipInfo, where: Union[str, Path], max_bytes: int) -> None:
    """Refuse a zip member larger than ``max_bytes`` uncompressed, or compressed more than 100x.

    Raises:
        BudgetError: naming ``where`` and the member.
    """
    if info.file_size > max_bytes:
        raise BudgetError(f"{where}: member {info.filename!r} inflates to {info.file_size:,} bytes, more than the "
                          f"{max_bytes:,} allowed")
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size > _RATIO_FLOOR
            and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)):
        raise BudgetError(f"{where}: member {info.filename!r} is compressed more than {MAX_COMPRESSION_RATIO}x "
                          "(a zip bomb?)")


def npz_headers(path: Union[str, Path], max_array_bytes: int = MAX_ARRAY_BYTES) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{name: (shape, dtype)}`` of every array in an ``.npz``, read from the headers only.

    Each member is checked with :func:`check_zip_member` and its header's ``shape x itemsize``
    against ``max_array_bytes`` before any array data is read.

    Raises:
        BudgetError: a member or array over the limits.
        ValueError: not an npz of plain ``.npy`` arrays (object arrays included: never unpickled).
    """
    import numpy as np

    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            check_zip_member(info, path, max_array_bytes + 4096)
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: array {info.filename!r} holds Python objects (never unpickled)")
            n = 1
            for s in shape:
                n *= int(s)
            if n * dtype.itemsize > max_array_bytes:
                raise BudgetError(f"{path}: array {info.filename[:-4]!r} of shape {tuple(shape)} needs "
                                  f"{n * dtype.itemsize:,} bytes, more than the {max_array_bytes:,} allowed")
            out[info.filename[:-4]] = (tuple(int(s) for s in shape), dtype)
    return out


def check_tensor_storage(sd: Mapping[str, Any], where: Union[str, Path]) -> None:
    """Refuse tensors that claim more elements than the bytes they are stored in (stride 0, overlaps).

    Each tensor must fit in its own storage, and all tensors together may need at most twice the
    distinct storages they view (tied weights) plus 1 MiB; the storages were read from the file, so
    cloning or converting them costs a small multiple of the file's own size, never the size a
    stride-0 view pretends to have.

    Raises:
        BudgetError: naming ``where`` and the first offending tensor.
    """
    import torch

    storages: dict[tuple[int, int], int] = {}
    needed = 0
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        nbytes = t.numel() * t.element_size()
        if nbytes > storage.nbytes():
            raise BudgetError(f"{where}: tensor {name!r} of shape {tuple(t.shape)} views only {storage.nbytes():,} "
                              "stored bytes (a stride-0 or overlapping tensor); refused before copying it")
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        needed += nbytes
    stored = sum(storages.values())
    # tied weights may view one storage twice; more than that is an amplification
    if needed > 2 * stored + (1 << 20):
        raise BudgetError(f"{where}: the tensors claim {needed:,} bytes but only {stored:,} are stored "
                          "(overlapping views); refused before copying them")

