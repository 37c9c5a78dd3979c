"""The output folder of a batch job before any rank writes: settings guard, crash leftovers, manifest compaction.

Used by :mod:`tag2mask.jobs.runner` (rank 0 runs :func:`prepare_job_folder` and shares the result).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from tag2mask.io.manifest import (
    MANIFEST_NAME,
    SettingsMismatchError,
    compact_manifest,
    recorded_items,
    settings_diff,
    write_settings,
)

__all__ = ["prepare_job_folder", "remove_stale_temp_files"]

# our atomic writers' temporary names: ".<name>.<8 random chars>.tmp[.<ext>]"
_TMP_NAME = re.compile(r"^\..*\.[A-Za-z0-9_]{8}\.tmp(\.[^./]*)?$")


def remove_stale_temp_files(out_dir: Path) -> int:
    """Delete temporary files left by writers killed mid-write (only our own naming pattern)."""
    removed = 0
    for root, _dirs, files in os.walk(out_dir):
        for name in files:
            if _TMP_NAME.match(name):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def prepare_job_folder(out_dir: Path, settings: dict[str, Any], overwrite: bool, resume: bool) -> dict[str, Any]:
    """Rank 0, before any rank writes: rerun and settings guards, crash leftovers, manifest compaction."""
    diff = settings_diff(out_dir, settings)
    if diff and not overwrite:
        raise SettingsMismatchError(
            f"{out_dir} holds results made with different settings ({', '.join(diff)}); "
            "choose another --out or pass --overwrite"
        )
    if not resume and not overwrite:
        earlier = recorded_items(out_dir)
        if earlier:
            # never recompute over finished outputs silently: a hand-corrected mask would be lost
            raise SettingsMismatchError(
                f"{out_dir} already holds the results of an earlier run ({earlier} item(s) in its manifest); "
                "continue it with --resume, pass --overwrite to redo every item, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temp_files(out_dir)
    compact_manifest(out_dir)  # fold rank files of an interrupted run in, whatever its world size
    replaced = None
    if diff:
        # old records describe outputs of other settings: never resume from them, keep them for reference
        stamp = time.strftime("%Y%m%d-%H%M%S")
        replaced = out_dir / "logs" / f"manifest.replaced-{stamp}.jsonl"
        replaced.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out_dir / MANIFEST_NAME, replaced)
    write_settings(out_dir, settings)
    return {"stale_temp_files_removed": stale, "settings_changed": diff, "replaced_manifest": str(replaced) if replaced else None}
