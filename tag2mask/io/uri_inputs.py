"""Inputs named by a URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``): listed and read through
``pyarrow.fs``, the file-system layer Ray Data reads with, or through ``fsspec`` for the schemes pyarrow does
not know (``pyarrow.fs.FSSpecHandler``).

Only bytes come from here: images are decoded by tag2mask's own decoder
(:func:`tag2mask.data.images.load_image` with ``data=``). Credentials are the file system's own (for S3 the
usual ``AWS_*`` variables, ``~/.aws``, instance roles; for GCS ``GOOGLE_APPLICATION_CREDENTIALS``): nothing
here reads or stores them. Tested on ``file://`` only, not against a real bucket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable, Optional

__all__ = ["RemoteFile", "is_uri", "list_uri", "read_uri", "input_state", "relative_input"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(name: Any) -> bool:
    """Whether ``name`` is a ``scheme://...`` input (a string; ``hf://`` names runs, not inputs)."""
    return isinstance(name, str) and bool(_SCHEME.match(name)) and not name.startswith("hf://")


@dataclass(frozen=True)
class RemoteFile:
    """One input file named by its URI, with its size and time as listed (for ``--resume``'s input check)."""

    uri: str
    size: Optional[int] = None
    mtime_ns: Optional[int] = None

    @property
    def name(self) -> str:
        return PurePosixPath(self.uri.split("://", 1)[1]).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def __str__(self) -> str:
        return self.uri


def _filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` of ``uri`` (made per call: simple, and small next to a
    model's time per image)."""
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise ImportError(f"{uri}: URI inputs need pyarrow (installed with the extra 'ray')") from None
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as arrow_error:  # a scheme pyarrow does not know: fsspec's, if installed
        try:
            import fsspec

            inner, path = fsspec.core.url_to_fs(uri)
        except Exception:
            raise ValueError(f"{uri}: no file system for this URI ({arrow_error}); pyarrow reads file://, s3://, "
                             "gs://, hdfs://, abfs://; other schemes need fsspec and its driver") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(inner)), path


def list_uri(uri: str, suffixes: Optional[Iterable[str]], recursive: bool = False) -> list[RemoteFile]:
    """The files under ``uri`` (a prefix / folder; directly under it unless ``recursive``) whose suffix is in
    ``suffixes`` (``None``: every file), sorted by key; or ``uri`` itself when it names one file. Each is
    named ``uri/<relative key>``.

    Raises:
        FileNotFoundError: nothing at ``uri``.
    """
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such object or prefix")
    if info.type == pafs.FileType.File:
        return [RemoteFile(uri, info.size, info.mtime_ns)]
    wanted = None if suffixes is None else {s.lower() for s in suffixes}
    base, root = uri.rstrip("/"), root.rstrip("/")
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=recursive)):
        if entry.type == pafs.FileType.Directory or (
                wanted is not None and PurePosixPath(entry.path).suffix.lower() not in wanted):
            continue
        rel = entry.path[len(root):].lstrip("/")
        found.append(RemoteFile(f"{base}/{rel}", entry.size, entry.mtime_ns))
    return sorted(found, key=lambda f: f.uri)


def read_uri(uri: str) -> bytes:
    """The bytes of the file at ``uri`` (``OSError`` when it cannot be read)."""
    fs, path = _filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def input_state(item: Any) -> Optional[dict[str, Any]]:
    """``{"path", "size", "mtime_ns"}`` of an input as it is now: a :class:`RemoteFile` as listed, a local
    path from ``os.stat`` (:func:`tag2mask.io.manifest.file_state`)."""
    if isinstance(item, RemoteFile):
        return {"path": item.uri, "size": item.size, "mtime_ns": item.mtime_ns}
    from tag2mask.io.manifest import file_state

    return file_state(item)


def relative_input(item: Any, root: Any) -> str:
    """``item``'s name relative to its folder ``root`` (POSIX), as the manifest's ``image`` field records it;
    the item's full name when it lies elsewhere. ``item``/``root``: a :class:`RemoteFile` and its URI prefix, or
    local paths."""
    from pathlib import Path

    if isinstance(item, RemoteFile):
        prefix = str(root).rstrip("/") + "/"
        return item.uri[len(prefix):] if item.uri.startswith(prefix) else item.uri
    try:
        return Path(item).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(item)
