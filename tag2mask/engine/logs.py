"""Training logs that are only ever appended: ``<name>.csv`` and ``<name>.jsonl`` per stream.

A resumed run appends after what is there (nothing is truncated, ever), so iterations between the
checkpoint it resumed from and the moment the previous process died appear twice; every row
carries ``session`` (0 for the first launch, +1 per resume) and the JSON-lines file gets an explicit
``{"event": "resume", ...}`` line. Readers take the latest row per iteration: :func:`read_log`.

The CSV keeps the columns of its first row (later keys go to the JSON-lines file only), so
spreadsheet tools and ``csv.DictReader`` read it directly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from tag2mask.jobs.checkpoint import DiskFullError, honour_umask, is_disk_full

__all__ = ["TrainLog", "read_log", "read_events"]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class TrainLog:
    """Appends rows to ``<folder>/<name>.csv`` and ``<folder>/<name>.jsonl``.

    Args:
        folder: the run folder.
        name: stream name (``train_log``, ``val_log``).
        session: how many times this run was resumed before (stored in every row).
        resume_hint: the command that continues the run (for the disk-full message).
    """

    def __init__(self, folder: Union[str, Path], name: str, session: int, resume_hint: str = "") -> None:
        self.csv_path = Path(folder) / f"{name}.csv"
        self.jsonl_path = Path(folder) / f"{name}.jsonl"
        self.session = int(session)
        self.resume_hint = resume_hint
        self._fields: Optional[list[str]] = None
        if self.csv_path.is_file() and self.csv_path.stat().st_size > 0:
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            self._fields = list(header) if header else None

    def _write(self, path: Path, text: str) -> None:
        new = not path.exists()
        try:
            # a previous process killed mid-line leaves no trailing newline: start on a fresh line
            if not new and path.stat().st_size > 0:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        text = "\n" + text
            with open(path, "a", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(path, self.resume_hint) from None
            raise
        if new:
            honour_umask(path)

    def event(self, kind: str, **fields: Any) -> None:
        """A JSON-lines event (``resume``, ``start``, ``finish`` ...), not a CSV row."""
        rec = {"event": kind, "session": self.session, "time": round(time.time(), 3), **fields}
        self._write(self.jsonl_path, json.dumps(rec, default=str) + "\n")

    def row(self, values: dict[str, Any]) -> None:
        """Append one row (``values`` must contain ``iteration``)."""
        rec = {"iteration": int(values["iteration"]), "session": self.session,
               **{k: _plain(v) for k, v in values.items() if k != "iteration"}}
        self._write(self.jsonl_path, json.dumps(rec, default=str) + "\n")
        if self._fields is None:
            self._fields = list(rec)
            header = ",".join(self._fields) + "\n"
        else:
            header = ""
        import io

        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self._fields, extrasaction="ignore", lineterminator="\n").writerow(rec)
        self._write(self.csv_path, header + buf.getvalue())


def read_log(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` or ``.jsonl`` training log, the latest row per iteration, by iteration.

    Values of a CSV are converted to int/float where they parse; unreadable lines (cut by a kill)
    are skipped.
    """
    path = Path(path)
    latest: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return []
    if path.suffix == ".jsonl":
        for rec in _json_records(path):
            if "event" not in rec and "iteration" in rec:
                latest[int(rec["iteration"])] = rec
    else:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for rec in csv.DictReader(f):
                try:
                    it = int(rec["iteration"])
                except (TypeError, ValueError, KeyError):
                    continue
                latest[it] = {k: _number(v) for k, v in rec.items() if k is not None}
    return [latest[k] for k in sorted(latest)]


def read_events(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The ``event`` lines of a ``.jsonl`` log, in order."""
    path = Path(path)
    return [rec for rec in _json_records(path) if "event" in rec] if path.is_file() else []


def _json_records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, in order; lines that do not parse (cut by a kill) are skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def _number(text: Optional[str]) -> Any:
    if text is None or text == "":
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
