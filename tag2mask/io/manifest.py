"""Run manifests for batch jobs: one JSON line per finished item, appended and fsynced as it happens.

Layout of a run folder (see ``docs/batch_jobs.md``):

* ``manifest.jsonl`` -- the compacted manifest: one line per item (its latest outcome), sorted
  by item name. Rewritten atomically (temp file + fsync + rename) when a run starts and ends.
* ``manifest.rank<r>.jsonl`` -- what rank ``r`` appends while a run is going (one file per rank,
  so concurrent ranks never interleave writes). Folded into ``manifest.jsonl`` by
  :func:`compact_manifest` and deleted.
* ``settings.json`` -- the settings of the first run (the overwrite guard).

A record::

    {"item": "sub/img", "status": "ok", "outputs": ["masks/sub/img.png", ...],
     "bytes": [812, ...], "sha256": ["9f2c...", ...], "rank": 0, "seconds": 0.41, "time": 1.7e9, ...}
    {"item": "bad", "status": "error", "outputs": [], "error": "...", "error_kind": "decode", ...}

Output paths are relative to the run folder (POSIX separators), so a run folder can be moved or
mounted elsewhere. ``--resume`` trusts an ``ok`` line only if every output it lists exists with
the recorded size and SHA-256, and its ``source`` (the input's size and modification time, when the
command records it) still matches; anything else (a line cut by ``kill -9``, a missing or replaced
file, an input edited since) makes the item be redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

__all__ = [
    "MANIFEST_NAME",
    "SettingsMismatchError",
    "RunManifest",
    "check_settings",
    "settings_diff",
    "write_settings",
    "compact_manifest",
    "iter_records",
    "latest_records",
    "rank_manifest_paths",
    "recorded_items",
    "file_sha256",
    "file_state",
    "verify_outputs",
]

MANIFEST_NAME = "manifest.jsonl"
_RANK_FILE = re.compile(r"^manifest\.rank(\d+)\.jsonl$")


class SettingsMismatchError(ValueError):
    """Re-running into a folder written with different settings, without ``--overwrite``."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (flat memory for large arrays)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_state(path: Any) -> Optional[dict[str, Any]]:
    """``{"path", "size", "mtime_ns"}`` of an input file as it is now (None if it cannot be read).

    Recorded with each finished item, so that ``--resume`` notices an input replaced since.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class RunManifest:
    """Append-only record of item outcomes in ``<run>/<name>``; each line is fsynced."""

    def __init__(self, run_dir: Path, name: str = MANIFEST_NAME):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def completed(self, verify: bool = True) -> dict[str, dict[str, Any]]:
        """Items whose last record is ``ok`` and whose outputs verify (see :func:`verify_outputs`)."""
        done: dict[str, dict[str, Any]] = {}
        for rec in latest_records([self.path]).values():
            if rec.get("status") == "ok" and (not verify or verify_outputs(self.run_dir, rec) is None):
                done[rec["item"]] = rec
        return done

    def _open(self):
        # a previous process killed mid-line leaves no trailing newline: start on a fresh line so the
        # cut line stays the only unreadable one
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._fh = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._fh.write("\n")

    def record(self, item: str, status: str, outputs: Iterable[str] = (), error: Optional[str] = None, **extra: Any) -> None:
        """Append one line and fsync it, so a crash right after loses nothing that was recorded."""
        if self._fh is None:
            self._open()
        rec = {"item": item, "status": status, "outputs": [str(p) for p in outputs]}
        if error is not None:
            rec["error"] = error
        rec.update(extra)
        rec.setdefault("time", round(time.time(), 3))
        self._fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
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


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Parsed lines of one manifest file; unreadable lines (cut by a crash) are skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # cut by a crash, or not JSON we can read
                continue
            if isinstance(rec, dict) and isinstance(rec.get("item"), str):
                yield rec


def latest_records(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """The last record of every item over ``paths`` read in order (later files win)."""
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        for rec in iter_records(p):
            out[rec["item"]] = rec
    return out


def rank_manifest_paths(run_dir: Path) -> list[Path]:
    """``manifest.rank<r>.jsonl`` files in ``run_dir``, by rank."""
    found = []
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _RANK_FILE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def recorded_items(run_dir: Path) -> int:
    """How many items the manifests of ``run_dir`` record (0 for a new or empty folder)."""
    run_dir = Path(run_dir)
    return len(latest_records([run_dir / MANIFEST_NAME, *rank_manifest_paths(run_dir)])) if run_dir.is_dir() else 0


def compact_manifest(run_dir: Path) -> dict[str, int]:
    """Fold the per-rank files into ``manifest.jsonl``: one line per item (its latest), sorted.

    Crash-safe and idempotent: the new ``manifest.jsonl`` is written atomically *before* the rank
    files are removed, and re-applying a rank file over a manifest that already contains it
    changes nothing. Call it while no rank is appending.

    Returns:
        counts of the compacted manifest by status (``{"ok": n, "error": m}``).
    """
    from tag2mask.io.atomic import atomic_path

    run_dir = Path(run_dir)
    main = run_dir / MANIFEST_NAME
    ranks = rank_manifest_paths(run_dir)
    # keep each item's latest line as compact JSON text, not a parsed dict: a few hundred bytes per
    # item instead of a few kilobytes, so compacting a 10k-item run costs megabytes, not tens of them
    latest: dict[str, tuple[str, str]] = {}
    for p in (main, *ranks):
        for rec in iter_records(p):
            latest[rec["item"]] = (str(rec.get("status", "?")), json.dumps(rec, ensure_ascii=False, default=str))
    counts: dict[str, int] = {}
    with atomic_path(main) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for item in sorted(latest):
                status, line = latest[item]
                counts[status] = counts.get(status, 0) + 1
                f.write(line + "\n")
    for p in ranks:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return counts


def verify_outputs(run_dir: Path, rec: dict[str, Any], check_hash: bool = True,
                   source: str = MANIFEST_NAME) -> Optional[str]:
    """``None`` if every output of an ``ok`` record is present and intact, else the reason.

    Paths are relative to ``run_dir``; every one must resolve inside it
    (:func:`tag2mask.io.paths.path_inside`). When the record lists ``bytes`` / ``sha256`` they must
    match; older records without them only need non-empty files.

    Raises:
        UnsafePathError: an output path that resolves outside ``run_dir`` (a tampered manifest).
    """
    from tag2mask.io.paths import path_inside

    outputs = rec.get("outputs") or []
    sizes = rec.get("bytes")
    hashes = rec.get("sha256")
    if not outputs:
        return "record lists no outputs"
    where = Path(run_dir) / source  # the record's file, named in the error
    for i, rel in enumerate(outputs):
        p = path_inside(run_dir, rel, where)
        if not p.is_file():
            return f"{rel}: missing"
        size = p.stat().st_size
        if size == 0:
            return f"{rel}: empty"
        if sizes is not None and (i >= len(sizes) or sizes[i] != size):
            return f"{rel}: size {size} differs from the recorded one"
        if check_hash and hashes is not None and (i >= len(hashes) or file_sha256(p) != hashes[i]):
            return f"{rel}: content differs from the recorded SHA-256"
    return None


def settings_diff(run_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Names of settings that differ from ``<run>/settings.json`` (empty if none or no file)."""
    from tag2mask.io.json_files import read_json

    path = Path(run_dir) / "settings.json"
    if not path.exists():
        return []
    try:
        old = read_json(path)
    except ValueError as exc:
        raise SettingsMismatchError(f"{path}: unreadable settings file ({exc}); delete it or pass --overwrite") from exc
    # compare through JSON so that tuples/lists and other round-trip changes do not count
    new = json.loads(json.dumps(settings, default=str))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def write_settings(run_dir: Path, settings: dict[str, Any]) -> None:
    """Write ``<run>/settings.json`` atomically."""
    from tag2mask.io.atomic import atomic_write_text

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / "settings.json", json.dumps(settings, indent=2, sort_keys=True, default=str))


def check_settings(run_dir: Path, settings: dict[str, Any], overwrite: bool) -> list[str]:
    """Refuse to mix results of different settings in one folder unless ``overwrite``.

    The settings of the first run are kept in ``<run>/settings.json``.

    Returns:
        the names of the settings that changed (only possible with ``overwrite``).

    Raises:
        SettingsMismatchError: settings differ and ``overwrite`` is false.
    """
    diff = settings_diff(run_dir, settings)
    if diff and not overwrite:
        raise SettingsMismatchError(
            f"{run_dir} holds results made with different settings ({', '.join(diff)}); "
            "choose another --out or pass --overwrite"
        )
    write_settings(run_dir, settings)
    return diff
