"""Crash-safe training checkpoints: atomic writes, a JSON-lines record, resume from the newest valid one.

``save_checkpoint`` writes ``state`` with ``torch.save`` through a temporary file in the same
folder (fsync + rename), then appends ``{"path", "step", "bytes", "sha256"}`` to
``<folder>/checkpoints.jsonl`` (fsynced). ``latest_checkpoint`` returns the newest recorded
checkpoint whose file still has the recorded size and hash, so a training run killed with
``kill -9`` at any moment resumes from its last *complete* checkpoint. ``keep_last`` prunes old
files only after the new one is safely on disk.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional, Union

from tag2mask.io.atomic import atomic_path
from tag2mask.io.manifest import RunManifest, file_sha256, iter_records, verify_outputs

__all__ = ["save_checkpoint", "latest_checkpoint", "load_latest_checkpoint"]

RECORD = "checkpoints.jsonl"


def save_checkpoint(folder: Union[str, Path], step: int, state: Any, name: Optional[str] = None,
                    keep_last: Optional[int] = None) -> Path:
    """Save ``state`` as ``<folder>/<name or step-XXXXXXXX.pt>`` atomically and record it.

    Args:
        folder: checkpoint folder (created).
        step: training step (recorded; orders checkpoints).
        state: anything ``torch.save`` accepts (model / optimiser state dicts, RNG states ...).
        name: file name (default ``step-<step:08d>.pt``).
        keep_last: delete older recorded checkpoint files beyond this many (after the save).

    Returns:
        the checkpoint path.
    """
    import torch

    folder = Path(folder)
    path = folder / (name or f"step-{step:08d}.pt")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    with RunManifest(folder, RECORD) as record:
        record.record(path.name, "ok", outputs=[path.name], bytes=[path.stat().st_size],
                      sha256=[file_sha256(path)], step=int(step))
    if keep_last is not None and keep_last > 0:
        names = []
        for rec in iter_records(folder / RECORD):
            if rec["item"] in names:
                names.remove(rec["item"])
            names.append(rec["item"])
        for old in names[:-keep_last]:
            if old != path.name:
                with contextlib.suppress(FileNotFoundError):
                    (folder / old).unlink()
    return path


def latest_checkpoint(folder: Union[str, Path]) -> Optional[tuple[Path, int]]:
    """The newest recorded checkpoint that verifies (size and SHA-256): ``(path, step)``, or None."""
    folder = Path(folder)
    records = list(iter_records(folder / RECORD))
    for rec in sorted(records, key=lambda r: (r.get("step", -1), r.get("time", 0)), reverse=True):
        if rec.get("status") == "ok" and verify_outputs(folder, rec) is None:
            return folder / rec["outputs"][0], int(rec.get("step", -1))
    return None


def load_latest_checkpoint(folder: Union[str, Path], map_location: Any = "cpu") -> Optional[tuple[Any, int]]:
    """``(state, step)`` of :func:`latest_checkpoint`, loaded with ``torch.load``; None if there is none."""
    import torch

    found = latest_checkpoint(folder)
    if found is None:
        return None
    path, step = found
    return torch.load(path, map_location=map_location, weights_only=False), step
