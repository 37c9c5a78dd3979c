"""Crash-safe training checkpoints: atomic writes, a JSON-lines record, safe loading.

``save_checkpoint`` serialises ``state`` with ``torch.save`` into memory, writes the bytes through a
temporary file in the same folder (fsync + rename; a full disk raises :class:`DiskFullError`
naming the file), then appends ``{"item", "outputs", "bytes", "sha256", "step"}`` to
``<folder>/checkpoints.jsonl`` (fsynced). There is ONE file per save: "the latest checkpoint" is
the newest record whose file still has the recorded size and hash (:func:`latest_checkpoint`), so
a run killed with ``kill -9`` at any moment resumes from its last *complete* checkpoint.

Loading never unpickles Python objects: :func:`load_checkpoint` uses ``torch.load(weights_only=True)``,
which rebuilds tensors and plain containers only. A file that needs more (a pickled checkpoint of an
older tag2mask, or a crafted one) raises :class:`UnsafeCheckpointError` with what to do instead.
Checkpoints therefore hold only tensors and plain data (RNG states as tensors, configs as JSON text).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from tag2mask.io.atomic import atomic_write_bytes
from tag2mask.io.manifest import RunManifest, iter_records, verify_outputs
from tag2mask.io.paths import path_inside

__all__ = [
    "RECORD", "DiskFullError", "UnsafeCheckpointError", "save_checkpoint", "latest_checkpoint",
    "load_latest_checkpoint", "load_checkpoint", "resolve_checkpoint", "remove_stale_temp_files",
    "honour_umask", "is_disk_full",
]

RECORD = "checkpoints.jsonl"
#: temporary files of :func:`tag2mask.io.atomic.atomic_path`: ``.<stem>.<random>.tmp<suffix>``
_TEMP_FILE = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")


class DiskFullError(OSError):
    """The disk filled up while writing ``path``; the message says how to continue."""

    def __init__(self, path: Union[str, Path], hint: str = "", message: Optional[str] = None) -> None:
        self.path = str(path)
        msg = message or f"disk full while writing {path}: free some space" + (f", then {hint}" if hint else "")
        super().__init__(errno.ENOSPC, msg)

    def __str__(self) -> str:  # one line, without the "[Errno 28]" prefix
        return str(self.args[1])


class UnsafeCheckpointError(ValueError):  # noqa: N818 (public name)
    """A checkpoint that cannot be read without unpickling Python objects (never done)."""


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left" / "quota exceeded" errors."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def honour_umask(path: Union[str, Path]) -> None:
    """Give ``path`` the mode a plain ``open()`` would have (0666 minus the umask).

    For files written outside :func:`tag2mask.io.atomic.atomic_path` (which already does this) by a writer that
    picks its own mode, e.g. safetensors' ``save_file`` (0600): outputs are meant to be shared like any other.
    """
    from tag2mask.io.atomic import current_umask

    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~current_umask())


def save_checkpoint(folder: Union[str, Path], step: int, state: Any, name: Optional[str] = None,
                    keep_last: Optional[int] = None, resume_hint: str = "") -> Path:
    """Save ``state`` as ``<folder>/<name or step-XXXXXXXX.pt>`` atomically and record it.

    Args:
        folder: checkpoint folder (created).
        step: training step (recorded; orders checkpoints).
        state: tensors and plain data only (dicts, lists, tuples, str, int, float, bool, None):
            anything else could not be loaded back by :func:`load_checkpoint`.
        name: file name (default ``step-<step:08d>.pt``).
        keep_last: delete older recorded checkpoint files beyond this many (after the save).
        resume_hint: what the user should run after a full disk (part of the error message).

    Returns:
        the checkpoint path.

    Raises:
        DiskFullError: no space left for the file or its record (the previous checkpoints are intact).
        UnsafePathError: ``checkpoints.jsonl`` names a file outside ``folder`` (nothing is deleted).
    """
    import hashlib

    import torch

    folder = Path(folder)
    path = folder / (name or f"step-{step:08d}.pt")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(path, resume_hint) from None
        raise
    try:
        with RunManifest(folder, RECORD) as record:
            record.record(path.name, "ok", outputs=[path.name], bytes=[len(data)],
                          sha256=[hashlib.sha256(data).hexdigest()], step=int(step))
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(folder / RECORD, resume_hint) from None
        raise
    if keep_last is not None and keep_last > 0:
        names: list[str] = []
        for rec in _checked_records(folder):
            if rec["item"] in names:
                names.remove(rec["item"])
            names.append(rec["item"])
        for old in names[:-keep_last]:
            # the record may have been edited (a run folder can come from someone else): only
            # files inside the folder are ever deleted
            victim = path_inside(folder, old, folder / RECORD)
            if victim != path.resolve() and victim.is_file():
                with contextlib.suppress(FileNotFoundError):
                    victim.unlink()
    return path


def _checked_records(folder: Path) -> list[dict[str, Any]]:
    """The records of ``<folder>/checkpoints.jsonl``, every named file checked to lie inside ``folder``.

    Checked all at once, before anything is loaded or deleted, so a tampered record stops a resume
    at its start with an error naming the record file and the entry.
    """
    records = list(iter_records(folder / RECORD))
    for rec in records:
        path_inside(folder, rec["item"], folder / RECORD)
        for rel in rec.get("outputs") or []:
            path_inside(folder, rel, folder / RECORD)
    return records


def latest_checkpoint(folder: Union[str, Path]) -> Optional[tuple[Path, int]]:
    """The newest recorded checkpoint that verifies (size and SHA-256): ``(path, step)``, or None.

    Raises:
        UnsafePathError: a record names a file outside ``folder``.
    """
    folder = Path(folder)
    records = _checked_records(folder)
    for rec in sorted(records, key=lambda r: (r.get("step", -1), r.get("time", 0)), reverse=True):
        if rec.get("status") == "ok" and verify_outputs(folder, rec, source=RECORD) is None:
            return path_inside(folder, rec["outputs"][0], folder / RECORD), int(rec.get("step", -1))
    return None


#: ``format`` of the ``config.json`` of a hub-style run folder (:mod:`tag2mask.runs.hub`)
HUB_FORMAT = "tag2mask-hub-v1"


def is_hub_folder(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a hub-style run folder: ``model.safetensors`` + a ``config.json`` of :data:`HUB_FORMAT`
    (read as JSON only; a run folder of the engine has a ``config.json`` too, of another shape)."""
    p = Path(path)
    if not (p / "model.safetensors").is_file() or not (p / "config.json").is_file():
        return False
    try:
        return json.loads((p / "config.json").read_text(encoding="utf-8")).get("format") == HUB_FORMAT
    except (ValueError, AttributeError, OSError):
        return False


def is_hf_name(path: Union[str, Path]) -> bool:
    """Whether ``path`` is an ``hf://user/repo[@revision]`` run name (a string: a ``Path`` never is)."""
    return isinstance(path, str) and path.startswith("hf://")


def hf_snapshot(spec: str, allow_download: Optional[bool] = None) -> Path:
    """``hf://user/repo[@revision]`` -> its snapshot folder (optional extra ``hub``).

    By default offline: the local Hugging Face cache only (``local_files_only=True``), and a repository missing
    from it is a ``FileNotFoundError`` that names it and the command that fetches it. ``allow_download``
    (``--allow-download``; ``None``: ``TAG2MASK_ALLOW_DOWNLOAD``, as for CLIP weights): huggingface_hub fetches
    what the cache lacks (``local_files_only=False``).
    """
    from tag2mask.clip.loading import downloads_allowed

    allow_download = downloads_allowed(allow_download)
    repo, _, revision = spec[len("hf://"):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{spec}: expected hf://USER/REPO or hf://USER/REPO@REVISION")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{spec}: hf:// names need the optional extra 'hub': pip install 'tag2mask[hub]'") from None
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=not allow_download))
    except Exception as exc:  # huggingface_hub's own errors: not cached, no such revision, no network
        if allow_download:
            raise FileNotFoundError(f"{spec}: could not be downloaded ({type(exc).__name__}: {exc})") from None
        fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise FileNotFoundError(
            f"{spec}: not in the local Hugging Face cache ({type(exc).__name__}); pass --allow-download to fetch "
            f"it, or fetch it with '{fetch}' (huggingface_hub's CLI), then run this again") from None


def resolve_checkpoint(path: Union[str, Path], allow_download: Optional[bool] = None) -> Path:
    """A checkpoint file, or the newest verified checkpoint of a run folder (a hub-style folder: its
    ``model.safetensors``); ``hf://user/repo[@revision]`` through :func:`hf_snapshot` (``allow_download``).

    Raises:
        FileNotFoundError: no such file, or a folder without a complete checkpoint.
    """
    p = hf_snapshot(path, allow_download) if is_hf_name(path) else Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None and is_hub_folder(p):
            return p / "model.safetensors"
        if found is None:
            hint = (f"; it holds a latest.pt of an older tag2mask: re-save it with 'tag2mask convert checkpoint "
                    f"{p / 'latest.pt'} --out NEW_RUN'") if (p / "latest.pt").is_file() else ""
            raise FileNotFoundError(f"{p}: no complete checkpoint recorded in {RECORD}{hint}")
        return found[0]
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers, never Python objects.

    ``path`` may be a run folder (its newest verified checkpoint).

    Raises:
        UnsafeCheckpointError: the file holds pickled Python objects (an older tag2mask checkpoint,
            another program's file, or a crafted one); nothing in it was executed.
        ValueError: not a readable checkpoint at all.
    """
    import torch

    from tag2mask.io.torch_files import UnsafeFileError, safe_torch_load

    p = resolve_checkpoint(path)
    try:
        return safe_torch_load(p, "checkpoint", map_location=map_location,
                               hint="if it is a checkpoint of an older tag2mask, re-save it in the safe format "
                                    f"with: tag2mask convert checkpoint {p} --out NEW_RUN")
    except UnsafeFileError as exc:
        raise UnsafeCheckpointError(str(exc)) from None


def load_latest_checkpoint(folder: Union[str, Path], map_location: Any = "cpu") -> Optional[tuple[Any, int]]:
    """``(state, step)`` of :func:`latest_checkpoint`, loaded with :func:`load_checkpoint`; None if none."""
    found = latest_checkpoint(folder)
    if found is None:
        return None
    path, step = found
    return load_checkpoint(path, map_location=map_location), step


def remove_stale_temp_files(folder: Union[str, Path]) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (not recursive); returns them.

    Only names of the form :func:`tag2mask.io.atomic.atomic_path` creates (``.<stem>.<random>.tmp<suffix>``)
    are touched. Call it only while nothing else writes into ``folder``.
    """
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and _TEMP_FILE.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed
