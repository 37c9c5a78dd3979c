"""The one line printed for Ctrl-C: what was kept, and how to continue (never a traceback)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


def interrupted_message(args: argparse.Namespace) -> str:
    """``tag2mask <command>: interrupted; ...`` naming what the run folder keeps and how to resume.

    Batch commands record every finished item as it finishes and training writes checkpoints
    atomically, so ``--resume`` continues exactly where the run stopped; this says so.
    """
    command = str(getattr(args, "command", "") or "")
    sub = getattr(args, "method", None) if command == "train" else getattr(args, "kind", None)
    command += f" {sub}" if isinstance(sub, str) and command in ("train", "convert", "synth") else ""
    out = getattr(args, "out", None)
    head = f"tag2mask {command or ''}".rstrip() + ": interrupted"
    if not out or not hasattr(args, "resume"):
        return head + "; nothing to resume"
    out_dir = Path(out)
    saved = _saved(out_dir)
    return (f"{head}; {saved}; run the same command with --resume to continue exactly where it stopped")


def _saved(out_dir: Path) -> str:
    from tag2mask.io.manifest import MANIFEST_NAME, latest_records, rank_manifest_paths
    from tag2mask.jobs.checkpoint import RECORD

    if (out_dir / RECORD).is_file():
        step = _latest_step(out_dir)
        return (f"checkpoint of iteration {step} kept in {out_dir}" if step is not None
                else f"no checkpoint was complete yet in {out_dir}")
    if out_dir.is_dir():
        records = latest_records([out_dir / MANIFEST_NAME, *rank_manifest_paths(out_dir)])
        done = sum(1 for r in records.values() if r.get("status") == "ok")
        return f"{done} finished item(s) recorded in {out_dir}"
    return f"nothing was written to {out_dir} yet"


def _latest_step(out_dir: Path) -> Optional[int]:
    from tag2mask.jobs.checkpoint import latest_checkpoint

    try:
        found = latest_checkpoint(out_dir)
    except ValueError:
        return None
    return found[1] if found else None
