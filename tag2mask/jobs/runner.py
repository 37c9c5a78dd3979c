"""A reusable, crash-safe, resumable, shardable batch-job runner.

A command supplies a sequence of items and ``process_fn(item) -> output paths`` (which must
write each output atomically, e.g. with :func:`tag2mask.io.atomic.atomic_path`); the runner
does the rest:

* **sharding** -- under ``torchrun`` rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...``
  (deterministic, no communication), and writes only its own manifest / log files, so ranks
  never collide; the output file names come from the item names, which are unique;
* **manifest** -- one fsynced JSON line per finished item in ``manifest.rank<r>.jsonl``, compacted
  into ``manifest.jsonl`` (one line per item) by rank 0 when the run starts and ends;
* **resume** -- with ``resume=True`` an item whose ``ok`` record verifies (outputs present, same
  size and SHA-256, and -- when the command describes its inputs with ``source_of`` -- the input
  file still has the recorded size and modification time) is skipped; everything else is redone.
  ``kill -9`` at any moment leaves at worst a stray temporary file (removed at the next start) and
  a cut manifest line (ignored);
* **disk full** -- ``ENOSPC`` / ``EDQUOT`` stops the job at once with :class:`DiskFullError` (one
  line naming the file and how to resume), instead of failing every remaining item;
* **settings guard** -- a folder written with other settings is refused unless ``overwrite``;
* **bad items** -- an exception in ``process_fn`` becomes an ``error`` record with a kind and a
  message naming the item; the job goes on; the exit code is 1 when any item failed;
* **observability** -- a progress bar (items/s, ETA) on rank 0, structured JSON-lines logs in
  ``logs/rank<r>.log``, a merged summary in ``run.json``.

Memory is flat in the number of items: results are written and forgotten; only counters, the
first few failures and (for resume) the manifest lines of finished items are kept.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar, Union

from tag2mask.io.manifest import (
    MANIFEST_NAME,
    RunManifest,
    SettingsMismatchError,
    compact_manifest,
    file_sha256,
    latest_records,
    settings_diff,
    verify_outputs,
    write_settings,
)
from tag2mask.jobs import distributed as D

__all__ = ["JobOptions", "ItemError", "ItemOutput", "JobSummary", "JobLog", "DiskFullError", "run_items", "error_kind",
           "print_summary", "process_exit_code"]

T = TypeVar("T")
#: how many failures each rank keeps for the printed summary (the manifest has all of them)
MAX_LISTED_FAILURES = 20
# temporary files of tag2mask.io.atomic.atomic_path: ".<stem>.<8 random chars>.tmp<suffix>"
_TMP_NAME = re.compile(r"^\..*\.[A-Za-z0-9_]{8}\.tmp(\.[^./]*)?$")


@dataclass
class JobOptions:
    """What every batch command exposes (``add_run_options``) plus a label for the bar."""

    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    verbose: bool = False
    limit: Optional[int] = None
    desc: str = "job"
    unit: str = "img"


class DiskFullError(OSError):
    """The disk (or the quota) is full: the job stops; finished items stay and ``--resume`` continues."""


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _disk_full(exc: BaseException, out_dir: Path, written: int) -> Optional[DiskFullError]:
    """A :class:`DiskFullError` for ``exc`` (or something it was raised from) if it is ENOSPC/EDQUOT."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError):
            return exc
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            where = exc.filename or exc.filename2 or f"the run folder {out_dir}"
            err = DiskFullError(
                f"no space left on the device while writing {where}; the job stopped ({written} new items written, "
                f"finished items are kept). Free some space, then run the same command again with --resume"
            )
            err.errno = exc.errno
            return err
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class ItemError(Exception):
    """Raise from ``process_fn`` for an expected, clearly explained per-item failure."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ItemOutput:
    """What ``process_fn`` may return instead of a bare path list: outputs plus record fields."""

    outputs: Sequence[Union[str, Path]]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobSummary:
    """Outcome of a run, merged over ranks on every rank."""

    items: int = 0
    written: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    world_size: int = 1
    failures: list[tuple[str, str]] = field(default_factory=list)
    manifest_counts: dict[str, int] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every item succeeded (or was already done), 1 when any failed."""
        return 1 if self.failed else 0

    @property
    def images_per_second(self) -> Optional[float]:
        return round(self.written / self.seconds, 3) if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [list(f) for f in self.failures]
        d["images_per_second"] = self.images_per_second
        d["exit_code"] = self.exit_code
        return d


class JobLog:
    """Structured log: one JSON object per line in ``<out>/logs/rank<r>.log`` (appended across runs)."""

    def __init__(self, out_dir: Path, rank: int, echo: bool = False, bar: Any = None) -> None:
        self.path = Path(out_dir) / "logs" / f"rank{rank}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.echo = echo
        self.bar = bar
        self._fh = open(self.path, "a", encoding="utf-8")

    def event(self, name: str, **fields: Any) -> None:
        rec = {"time": round(time.time(), 3), "rank": self.rank, "event": name, **fields}
        self._fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
        self._fh.flush()  # no fsync: the log is for people; the manifest is the record of truth
        if self.echo:
            text = f"[rank {self.rank}] {name} " + " ".join(f"{k}={v}" for k, v in fields.items())
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr)

    def close(self) -> None:
        self._fh.close()


def error_kind(exc: BaseException, default: str = "internal") -> str:
    """A short machine-readable category for a per-item exception (``default`` when unknown)."""
    if isinstance(exc, ItemError):
        return exc.kind
    from tag2mask.data.images import ImageDecodeError
    from tag2mask.data.labels import LabelFileError

    if isinstance(exc, ImageDecodeError):
        return "decode"
    if isinstance(exc, LabelFileError):
        return "labels"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out_of_memory"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return default


def _error_message(exc: BaseException) -> str:
    # our own errors already name the file and the problem; others get their type for context
    if isinstance(exc, ItemError) or error_kind(exc) in ("decode", "labels"):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _relative(path: Union[str, Path], out_dir: Path) -> str:
    p = Path(path)
    try:
        return p.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(p)  # outside the run folder: keep it absolute


def _remove_stale_temp_files(out_dir: Path) -> int:
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


def _prepare_folder(out_dir: Path, settings: dict[str, Any], options: JobOptions) -> dict[str, Any]:
    """Rank 0, before any rank writes: settings guard, crash leftovers, manifest compaction."""
    diff = settings_diff(out_dir, settings)
    if diff and not options.overwrite:
        raise SettingsMismatchError(
            f"{out_dir} holds results made with different settings ({', '.join(diff)}); "
            "choose another --out or pass --overwrite"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = _remove_stale_temp_files(out_dir)
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


def _collective(fn: Callable[[], Any], info: D.DistInfo) -> Any:
    """Run ``fn`` on rank 0, share its result, and make every rank raise if it failed.

    Without this, an exception on rank 0 would leave the other ranks waiting at the next barrier.
    """
    result, error, raised = None, None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below on every rank, with the same message
            raised = exc
            error = (type(exc).__name__, str(exc), isinstance(exc, ValueError))
    gathered = D.all_gather_object((result, error))
    if raised is not None:
        raise raised
    if gathered[0][1] is not None:
        name, msg, is_value = gathered[0][1]
        # ValueError keeps the CLI's one-line "error:" treatment (e.g. the settings guard)
        raise ValueError(msg) if is_value else RuntimeError(f"rank 0 failed: {name}: {msg}")
    return gathered[0][0]


def run_items(
    items: Sequence[T],
    process_fn: Callable[[T], Union[Sequence[Union[str, Path]], ItemOutput]],
    out_dir: Union[str, Path],
    settings: dict[str, Any],
    options: JobOptions = JobOptions(),
    *,
    keys: Optional[Sequence[str]] = None,
    key_fn: Callable[[T], str] = lambda item: str(getattr(item, "name", item)),
    preflight_errors: Iterable[tuple[str, str]] = (),
    describe: Optional[Callable[[int], str]] = None,
    run_record: Optional[dict[str, Any]] = None,
    finalize: Optional[Callable[[Path, JobSummary], None]] = None,
    source_of: Optional[Callable[[int], Any]] = None,
) -> JobSummary:
    """Process ``items`` into ``out_dir`` with resume, sharding, manifest and logs.

    Args:
        items: a sequence (``len`` + indexing); ``items[i]`` is only evaluated inside the per-item
            error handler, so a lazily built item that fails to load becomes an error record.
        process_fn: ``item -> output paths`` (or :class:`ItemOutput`); raise to report a failure
            (:class:`ItemError` for a chosen ``error_kind``). Outputs must be written atomically.
        out_dir: the run folder (shared by all ranks).
        settings: everything that changes the outputs (the overwrite guard compares them).
        options: resume / overwrite / quiet / verbose / limit.
        keys: the unique manifest name of each item (default ``key_fn(items[i])``); output files
            should be named after it. Repeated keys are reported as ``duplicate`` errors.
        preflight_errors: ``(entry, message)`` problems found before the run (e.g. bad label-file
            entries); recorded once by rank 0 with kind ``labels``.
        describe: ``index -> text`` naming an item in messages (default: ``item #<index> (<key>)``).
        run_record: extra fields for ``run.json`` (versions, settings...).
        finalize: rank 0 calls ``finalize(out_dir, summary)`` after the merged manifest is written
            (e.g. to export COCO JSON); an exception there fails the run on every rank.
        source_of: ``index -> JSON-able description of the item's inputs`` as they are now (e.g.
            :func:`tag2mask.io.manifest.file_state` of its image, plus its labels); recorded with
            each finished item, and ``--resume`` redoes an item whose inputs no longer match.

    Raises:
        DiskFullError: the disk filled up; the job stopped at the first failed write.

    Returns:
        the :class:`JobSummary` merged over ranks (identical on every rank).
    """
    out_dir = Path(out_dir)
    info = D.dist_info()
    created = D.init_distributed(info)
    try:
        return _run(items, process_fn, out_dir, settings, options, keys, key_fn, list(preflight_errors),
                    describe, run_record if run_record is not None else {}, finalize, info, source_of)
    finally:
        D.shutdown(created)


def _current_source(source_of: Optional[Callable[[int], Any]], i: int) -> Any:
    """The item's input description, normalised through JSON (None when unknown or unreadable)."""
    if source_of is None:
        return None
    try:
        value = source_of(i)
    except Exception:  # a missing/unreadable input: the item itself will report it
        return None
    return None if value is None else json.loads(json.dumps(value, default=str))


def _run(items, process_fn, out_dir: Path, settings, options: JobOptions, keys, key_fn, preflight,
         describe, run_record, finalize, info: D.DistInfo, source_of=None) -> JobSummary:
    started = time.time()
    prep = _collective(lambda: _prepare_folder(out_dir, settings, options), info)

    n = len(items) if options.limit is None else max(0, min(options.limit, len(items)))
    shard = range(info.rank, n, info.world_size)
    # keys of all items (every rank computes the same list) -> duplicates are found identically
    key_of = (lambda i: keys[i]) if keys is not None else (lambda i: key_fn(items[i]))
    if describe is None:
        describe = lambda i: f"item #{i} ({key_of(i)})"  # noqa: E731
    first_index: dict[str, int] = {}
    for i in range(n):
        first_index.setdefault(key_of(i), i)
    done_lines = latest_records([out_dir / MANIFEST_NAME]) if options.resume else {}
    done = {k: r for k, r in done_lines.items() if r.get("status") == "ok"}
    del done_lines

    from tqdm import tqdm

    bar = tqdm(total=len(shard), desc=options.desc if info.world_size == 1 else f"{options.desc} [rank 0 of {info.world_size}]",
               unit=options.unit, disable=options.quiet or not info.is_main, file=sys.stderr, dynamic_ncols=True)
    log = JobLog(out_dir, info.rank, echo=options.verbose, bar=bar if not bar.disable else None)
    log.event("start", world_size=info.world_size, shard_items=len(shard), total_items=n, resume=options.resume, **prep)
    manifest = RunManifest(out_dir, f"manifest.rank{info.rank}.jsonl")
    written = skipped = failed = 0
    failures: list[tuple[str, str]] = []

    def fail(key: str, kind: str, message: str, **extra: Any) -> None:
        nonlocal failed
        failed += 1
        if len(failures) < MAX_LISTED_FAILURES:
            failures.append((key, message))
        manifest.record(key, "error", error=message, error_kind=kind, rank=info.rank, **extra)
        log.event("error", item=key, kind=kind, error=message)

    try:
        if info.is_main:
            for entry, message in preflight:
                fail(entry, "labels", message)
        for i in shard:
            key = key_of(i)
            if first_index[key] != i:
                # a distinct manifest name, so this record never replaces the first item's
                fail(f"{key} [duplicate #{i}]", "duplicate",
                     f"{describe(i)}: same output name {key!r} as {describe(first_index[key])} "
                     "(e.g. a.jpg and a.png in one folder); rename one of them", duplicate_of=key)
                bar.update(1)
                continue
            source = _current_source(source_of, i)
            if key in done:
                problem = verify_outputs(out_dir, done[key])
                if problem is None and source is not None and "source" in done[key] and done[key]["source"] != source:
                    problem = "the input changed since it was processed"
                if problem is None:
                    skipped += 1
                    bar.update(1)
                    continue
                log.event("redo", item=key, reason=problem)
            t0 = time.time()
            try:
                try:
                    item = items[i]
                except Exception as exc:  # a lazily built item (e.g. a VOC annotation) that cannot load
                    raise ItemError(error_kind(exc, default="load"), _error_message(exc)) from exc
                result = process_fn(item)
                if not isinstance(result, ItemOutput):
                    result = ItemOutput(list(result))
                outputs = [Path(p) for p in result.outputs]
                rel = [_relative(p, out_dir) for p in outputs]
                sizes = [p.stat().st_size for p in outputs]
                hashes = [file_sha256(p) for p in outputs]
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one bad item never stops the job; it is reported in the manifest
                full = _disk_full(exc, out_dir, written)
                if full is not None:  # every later item would fail the same way: stop now
                    raise full from exc
                kind = error_kind(exc)
                extra = {"traceback": traceback.format_exc(limit=8)} if kind == "internal" else {}
                fail(key, kind, _error_message(exc), seconds=round(time.time() - t0, 3), **extra)
                _release_cuda_memory(kind)
            else:
                extra = {"source": source} if source is not None else {}
                manifest.record(key, "ok", outputs=rel, bytes=sizes, sha256=hashes, rank=info.rank,
                                seconds=round(time.time() - t0, 3), **extra, **result.info)
                written += 1
                log.event("ok", item=key, seconds=round(time.time() - t0, 3))
            bar.update(1)
            bar.set_postfix_str(f"failed={failed}", refresh=False)
    except DiskFullError:
        raise
    except OSError as exc:  # the manifest or the log could not be written either
        full = _disk_full(exc, out_dir, written)
        if full is None:
            raise
        raise full from exc
    finally:
        try:
            manifest.close()
        except OSError:
            pass
        bar.close()

    mine = {"written": written, "skipped": skipped, "failed": failed, "failures": failures, "items": len(shard)}
    log.event("end", **{k: v for k, v in mine.items() if k != "failures"}, seconds=round(time.time() - started, 3))
    log.close()
    per_rank = D.all_gather_object(mine)  # also the barrier: every rank has finished writing
    summary = JobSummary(
        items=n + len(preflight),
        written=sum(r["written"] for r in per_rank),
        skipped=sum(r["skipped"] for r in per_rank),
        failed=sum(r["failed"] for r in per_rank),
        seconds=round(time.time() - started, 3),
        world_size=info.world_size,
        failures=[tuple(f) for r in per_rank for f in r["failures"]][:MAX_LISTED_FAILURES],
    )

    def finish() -> dict[str, int]:
        from tag2mask.io.atomic import atomic_write_text

        summary.manifest_counts = compact_manifest(out_dir)
        if finalize is not None:
            finalize(out_dir, summary)
        record = dict(run_record)
        record.update(summary.to_dict())
        record["per_rank"] = [{k: v for k, v in r.items() if k != "failures"} for r in per_rank]
        atomic_write_text(out_dir / "run.json", json.dumps(record, indent=2, default=str, ensure_ascii=False))
        return summary.manifest_counts

    summary.manifest_counts = _collective(finish, info)
    return summary


def _release_cuda_memory(kind: str) -> None:
    """After a CUDA out-of-memory error, give cached blocks back so the next item can run."""
    if kind != "out_of_memory":
        return
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort only
        pass


def process_exit_code(summary: JobSummary) -> int:
    """The exit code this process should return.

    Single process: :attr:`JobSummary.exit_code`. Under torchrun only rank 0 reports it (the other
    ranks' work is in its merged summary) and the others return 0: torchrun tears the whole group
    down as soon as one worker exits non-zero, so rank 0 also waits a moment for the others to
    have exited cleanly (all outputs are final by then) before returning 1.
    """
    info = D.dist_info()
    if not info.distributed:
        return summary.exit_code
    if not info.is_main or summary.exit_code == 0:
        return 0 if not info.is_main else summary.exit_code
    time.sleep(float(os.environ.get("TAG2MASK_EXIT_GRACE_S", "1.0")))
    return summary.exit_code


def print_summary(summary: JobSummary, out_dir: Union[str, Path], command: str) -> None:
    """The final human summary on stderr (rank 0 only under torchrun)."""
    if not D.dist_info().is_main:
        return
    print(f"{command}: {summary.written} written, {summary.skipped} already done, {summary.failed} failed "
          f"of {summary.items} items -> {out_dir}", file=sys.stderr)
    for name, msg in summary.failures:
        print(f"  failed {name}: {msg}", file=sys.stderr)
    if summary.failed > len(summary.failures):
        print(f"  ... and {summary.failed - len(summary.failures)} more; see {Path(out_dir) / MANIFEST_NAME}", file=sys.stderr)
