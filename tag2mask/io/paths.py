"""One rule for every path read out of a file: it must stay inside its folder.

A run folder, its manifests (``manifest.jsonl``, ``checkpoints.jsonl``), a run recipe or a labels
file may come from someone else. Any path written in them is resolved with :func:`path_inside`:
absolute paths and ``..`` are accepted only when the *resolved* path (symlinks followed) is the
folder itself or lies under it; anything else raises :class:`UnsafePathError` naming the file that
held the entry and the entry. Nothing read from such a file can therefore direct a read, a write or
a delete outside its folder.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Type, Union

__all__ = ["UnsafePathError", "path_inside", "checked_name", "MAX_NAME_BYTES"]

#: longest file-name component accepted (the common file-system limit, in bytes)
MAX_NAME_BYTES = 255


class UnsafePathError(ValueError):
    """A path read from a file is absolute/escapes its folder, or is not a usable name."""


def _reject(error: Type[Exception], where: str, entry: Any, why: str) -> Exception:
    prefix = f"{where}: " if where else ""
    return error(f"{prefix}entry {entry!r} {why}")


def checked_name(folder: Any, entry: Any, where: Union[str, Path] = "", error: Type[Exception] = UnsafePathError,
                 must_be_relative: bool = True) -> str:
    """The checks of :func:`path_inside` that need no file system: ``entry`` as POSIX text (``\\`` -> ``/``).

    On their own they serve names that are not local files (an object store's keys under a URI prefix,
    ``folder``); such a caller also refuses ``..`` itself, since there is nothing to resolve against.

    Raises:
        ``error``: not a string, empty, NUL byte, a component longer than :data:`MAX_NAME_BYTES`, absolute
        (with ``must_be_relative``), or a drive letter (off Windows).
    """
    where = str(where)
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise _reject(error, where, entry, "is an invalid name (empty, not text, or a NUL byte)")
    text = entry.replace("\\", "/")
    win = PureWindowsPath(entry)
    absolute = PurePosixPath(text).is_absolute() or win.is_absolute() or bool(win.drive)
    if must_be_relative and absolute:
        raise _reject(error, where, entry, f"is an absolute path; it must be relative to {folder}")
    if win.drive and os.name != "nt":
        raise _reject(error, where, entry, f"names a drive; it must be relative to {folder}")
    long = next((c for c in PurePosixPath(text).parts if len(c.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES), None)
    if long is not None:
        raise _reject(error, where, entry, f"has a name longer than {MAX_NAME_BYTES} bytes")
    return text


def path_inside(folder: Union[str, Path], entry: Any, where: Union[str, Path] = "",
                error: Type[Exception] = UnsafePathError, must_be_relative: bool = False) -> Path:
    """Resolve ``entry`` (a path read from file ``where``) against ``folder`` and check it stays inside.

    Args:
        folder: the folder the entry is relative to (a run folder, an image folder).
        entry: the path as read from the file (must be a non-empty ``str`` without NUL).
        where: the file that held the entry (named in the error).
        error: exception class raised (callers with their own error type pass it).
        must_be_relative: refuse absolute paths and drive letters even when they point inside.

    Returns:
        the resolved absolute path (symlinks followed), inside ``folder``.

    Raises:
        ``error`` (default :class:`UnsafePathError`): not a string, empty, NUL byte, a component
        longer than :data:`MAX_NAME_BYTES`, absolute (with ``must_be_relative``), or resolving
        outside ``folder``. A symlink loop inside ``folder`` is returned as written (opening it fails
        later, as an unreadable file).
    """
    where = str(where)
    text = checked_name(folder, entry, where, error, must_be_relative)
    root = Path(folder).resolve()
    lexical = Path(os.path.normpath(root / text))
    try:
        full = lexical.resolve()
    except (RuntimeError, OSError):
        # a symlink loop (RuntimeError on Python 3.11) points nowhere: judge the name as written, and
        # let whoever opens it report it as an unreadable file (one item, not the whole job)
        full = lexical
    if full != root and root not in full.parents:
        raise _reject(error, where, entry, f"resolves outside the folder {folder} (refused: a file read from a "
                      "folder may only name files inside it)")
    return full
