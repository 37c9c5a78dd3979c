"""Atomic file writing: readers never see a half-written output.

Every writer in tag2mask goes through :func:`atomic_path` / :func:`atomic_write_bytes`:
data is written to a temporary file in the *same folder* (so ``os.replace`` is a rename on
one file system, which is atomic on POSIX and Windows), flushed with ``fsync``, then moved
over the destination. If the writer raises, the temporary file is removed and the
destination is left untouched.

The temporary file is created with mode ``0o666`` minus the process umask, like any ``open()``
(``tempfile.mkstemp`` would make every output ``0600``, unreadable to the rest of a group that
shares masks and checkpoints). An ``OSError`` without a file name (a full disk reported by
``write`` or ``fsync``) gets the destination's name, so messages say which file failed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "current_umask"]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _short_stem(path: Path, limit: int = 255) -> str:
    """The destination's stem, cut so that the temporary name fits in ``limit`` bytes.

    A valid 240-byte image name would otherwise give a temporary name longer than the common
    255-byte file-name limit (``.<stem>.<8 chars>.tmp<suffix>`` adds 15 bytes and the suffix).
    """
    room = limit - len(f"..12345678.tmp{path.suffix}".encode("utf-8", "surrogateescape"))
    stem = path.stem.encode("utf-8", "surrogateescape")
    if len(stem) <= room:
        return path.stem
    return stem[:max(room, 1)].decode("utf-8", "ignore") or "t"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status`` on Linux);
    elsewhere by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _create_temp(path: Path) -> Path:
    """An empty new file ``.<stem>.<8 random chars>.tmp<suffix>`` next to ``path``, mode 0o666 & ~umask."""
    for _ in range(100):
        token = "".join(secrets.choice(_TEMP_ALPHABET) for _ in range(8))
        tmp = path.parent / f".{_short_stem(path)}.{token}.tmp{path.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: could not create a temporary file next to it")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps the destination's suffix so that libraries choosing the
    format from the extension (PIL, numpy's ``.npz``) behave as for the final name.
    Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: the writer did not create the temporary file {tmp}")
        _fsync_file(tmp)
        # writers that replace the file themselves (safetensors' save_file writes 0600 whatever the umask) would
        # otherwise decide the final mode: outputs are shared like any open()ed file
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = str(path)
        raise
    # persist the rename itself; not possible on every platform (e.g. Windows), so best effort
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))
