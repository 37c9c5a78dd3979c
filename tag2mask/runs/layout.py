"""Run folders of the training engine: the guard against overwriting, resume lookup, checkpoint reading.

A run folder holds ``config.json``, ``ckpt_<iter>.pt`` files recorded in ``checkpoints.jsonl``
(:mod:`tag2mask.jobs.checkpoint`) and the append-only logs. :func:`prepare_run_folder` decides, without
writing anything, whether a run may start there and from which checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional, Union

from tag2mask.jobs.checkpoint import RECORD, is_hub_folder, latest_checkpoint, load_checkpoint, resolve_checkpoint
from tag2mask.io.json_files import loads_named

__all__ = ["CHECKPOINT_FORMAT", "ENGINE_FILES", "RunFolderError", "prepare_run_folder", "clear_run",
           "read_run_checkpoint"]

CHECKPOINT_FORMAT = "tag2mask-train-v2"
#: files the engine writes into a run folder (removed by ``overwrite``)
ENGINE_FILES = ("config.json", RECORD, "train_log.csv", "train_log.jsonl", "val_log.csv", "val_log.jsonl")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (existing run without resume/overwrite, nothing to resume)."""


def _has_run(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def prepare_run_folder(out: Path, resume: Optional[str], overwrite: bool) -> Optional[Path]:
    """Check the run folder (read-only): the checkpoint to resume from, or None for a fresh start.

    Raises:
        RunFolderError: an existing run without ``resume``/``overwrite``; ``resume`` with logs but no
            complete checkpoint; both ``resume`` and ``overwrite``.
    """
    if resume is not None and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other (continue the run, or start it again)")
    if resume is not None and resume != "auto":
        return resolve_checkpoint(resume)
    if resume == "auto":
        found = latest_checkpoint(out)
        if found is not None:
            return found[0]
        if (out / "latest.pt").is_file():
            raise RunFolderError(
                f"{out}: holds a latest.pt of an older tag2mask, which is not loaded (pickled format); re-save it "
                f"with 'tag2mask convert checkpoint {out / 'latest.pt'} --out NEW_RUN' and resume from NEW_RUN")
        started = [n for n in ENGINE_FILES[1:] if (out / n).exists()] + [p.name for p in out.glob("ckpt_*.pt")]
        if started:
            raise RunFolderError(
                f"{out}: nothing to resume from: no complete checkpoint is recorded in {RECORD} (found "
                f"{', '.join(sorted(started)[:4])}); pass --overwrite to start this run again from iteration 0")
        return None
    if _has_run(out) and not overwrite:
        raise RunFolderError(
            f"{out} already exists and is not empty; continue its run with --resume, pass --overwrite to start "
            "again (its checkpoints and logs are deleted), or choose another --out")
    return None


def clear_run(out: Path) -> None:
    for name in ENGINE_FILES:
        (out / name).unlink(missing_ok=True)
    for p in out.glob("ckpt_*.pt"):
        p.unlink()
    if (out / "tb").is_dir():
        shutil.rmtree(out / "tb")


def read_run_checkpoint(path: Union[str, Path], task: Optional[str] = None) -> dict[str, Any]:
    """Load an engine checkpoint (file or run folder) with ``weights_only=True`` and check its format.

    The JSON fields come back parsed: ``config``, ``options``, ``meta``.
    """
    where = resolve_checkpoint(path)
    if where.name == "model.safetensors" and is_hub_folder(where.parent):
        from tag2mask.runs.hub import read_hub_checkpoint

        ckpt = read_hub_checkpoint(where.parent)  # JSON fields parsed already
        if task is not None and ckpt["task"] != task:
            raise ValueError(f"{where}: a {ckpt['task']!r} run, expected {task!r}")
        return ckpt
    ckpt = load_checkpoint(where)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: not a tag2mask training checkpoint (format {CHECKPOINT_FORMAT})")
    if task is not None and ckpt.get("task") != task:
        raise ValueError(f"{where}: a {ckpt.get('task')!r} checkpoint, expected {task!r}")
    if not isinstance(ckpt.get("modules"), dict) or not ckpt["modules"]:
        raise ValueError(f"{where}: a training checkpoint without model weights (no 'modules' entry)")
    out = dict(ckpt)
    for key in ("config", "options", "meta"):
        out[key] = loads_named(ckpt.get(f"{key}_json") or "{}", f"{where} ({key}_json)")
    out["path"] = str(where)
    return out
