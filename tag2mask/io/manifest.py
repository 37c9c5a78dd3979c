"""Run manifests for batch jobs: one JSON line per finished item, appended and flushed as it happens.

A run folder holds ``manifest.jsonl`` (item, status, outputs, error) and ``run.json`` (settings).
``--resume`` trusts an ``ok`` line only if every output it lists still exists and is non-empty,
so an item interrupted between writing its files and its manifest line is simply redone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional


class SettingsMismatchError(ValueError):
    """Re-running into a folder written with different settings, without ``--overwrite``."""


class RunManifest:
    """Append-only record of item outcomes in ``<run>/manifest.jsonl``."""

    def __init__(self, run_dir: Path, name: str = "manifest.jsonl"):
        self.path = Path(run_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def completed(self) -> dict[str, dict[str, Any]]:
        """Items whose last record is ``ok`` and whose listed outputs are all present."""
        done: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return done
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that item is redone
                if rec.get("status") == "ok" and all(
                    Path(p).is_file() and Path(p).stat().st_size > 0 for p in rec.get("outputs", [])
                ):
                    done[rec["item"]] = rec
                else:
                    done.pop(rec.get("item"), None)
        return done

    def record(self, item: str, status: str, outputs: Iterable[str] = (), error: Optional[str] = None, **extra: Any) -> None:
        """Append one line and fsync it, so a crash right after loses nothing that was recorded."""
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        rec = {"item": item, "status": status, "outputs": [str(p) for p in outputs], "time": round(time.time(), 3)}
        if error is not None:
            rec["error"] = error
        rec.update(extra)
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunManifest":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_settings(run_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix results of different settings in one folder unless ``overwrite``.

    The settings of the first run are kept in ``<run>/settings.json``.
    """
    path = Path(run_dir) / "settings.json"
    if path.exists() and not overwrite:
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise SettingsMismatchError(
                f"{run_dir} holds results made with different settings ({', '.join(diff)}); "
                "choose another --out or pass --overwrite"
            )
    from tag2mask.io.atomic import atomic_write_text

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True, default=str))
