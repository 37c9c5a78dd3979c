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
* **rerun guard** -- a folder whose manifest already records items is refused unless ``resume``
  (continue: finished items are kept) or ``overwrite`` (redo every item);
* **settings guard** -- a folder written with other settings is refused unless ``overwrite``;
* **bad items** -- an exception in ``process_fn`` becomes an ``error`` record with a kind and a
  message naming the item; the job goes on; the exit code is 1 when any item failed;
* **observability** -- a progress bar (items/s, ETA) on rank 0, structured JSON-lines logs in
  ``logs/rank<r>.log``, a merged summary in ``run.json``.

* **overlap** -- a command whose work per item is a :class:`~tag2mask.jobs.overlap.Stages` object
  (prepare -> compute -> finish) gets decoding and CPU post-processing in worker processes while
  this process runs the model on batches; the bookkeeping above is the same either way.

A job is described by one :class:`JobSpec` (:func:`run_job`); :func:`run_items` takes its fields as
arguments. Memory is flat in the number of items: results are written and forgotten; only counters,
the first few failures and (for resume) the manifest lines of finished items are kept.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar, Union

from tag2mask.io.manifest import (
    MANIFEST_NAME,
    RunManifest,
    compact_manifest,
    latest_records,
    verify_outputs,
)
from tag2mask.jobs import distributed as D
from tag2mask.jobs.job_folder import prepare_job_folder
from tag2mask.jobs.items import (
    DiskFullError,
    FinishedItem,
    ItemError,
    ItemFailure,
    ItemOutput,
    as_disk_full_error,
    disk_full_error,
    error_message,
    release_cuda_memory,
    error_kind,
    finished_item,
    item_failure,
)

__all__ = ["JobOptions", "JobSpec", "ItemError", "ItemOutput", "JobSummary", "JobLog", "DiskFullError", "run_items",
           "run_job", "error_kind", "print_summary", "process_exit_code", "FinishedItem", "ItemFailure"]

T = TypeVar("T")
#: how many failures each rank keeps for the printed summary (the manifest has all of them)
MAX_LISTED_FAILURES = 20
# temporary files of tag2mask.io.atomic.atomic_path: ".<stem>.<8 random chars>.tmp<suffix>"


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


@dataclass
class JobSpec:
    """Everything a batch job is made of (the arguments of :func:`run_items`), as one object.

    Attributes:
        items: a sequence (``len`` + indexing); ``items[i]`` is only evaluated inside the per-item
            error handler, so a lazily built item that fails to load becomes an error record.
        process: ``item -> output paths`` (or :class:`ItemOutput`); raise to report a failure
            (:class:`ItemError` for a chosen ``error_kind``). Outputs must be written atomically.
            A :class:`~tag2mask.jobs.overlap.Stages` object splits the work into stages that overlap
            across items in worker processes (``Stages.workers > 0``), or runs them item by item.
        out_dir: the run folder (shared by all ranks).
        settings: everything that changes the outputs (the overwrite guard compares them).
        options: resume / overwrite / quiet / verbose / limit.
        keys: the unique manifest name of each item (default ``key_fn(items[i])``); output files
            should be named after it. Repeated keys are reported as ``duplicate`` errors.
        key_fn: the manifest name of an item when ``keys`` is not given.
        preflight_errors: ``(entry, message)`` problems found before the run (e.g. bad label-file
            entries); recorded once by rank 0 with kind ``labels``.
        describe: ``index -> text`` naming an item in messages (default: ``item #<index> (<key>)``).
        run_record: extra fields for ``run.json`` (versions, settings...).
        finalize: rank 0 calls ``finalize(out_dir, summary)`` after the merged manifest is written
            (e.g. to export COCO JSON); an exception there fails the run on every rank.
        source_of: ``index -> JSON-able description of the item's inputs`` as they are now (e.g.
            :func:`tag2mask.io.manifest.file_state` of its image, plus its labels); recorded with
            each finished item, and ``--resume`` redoes an item whose inputs no longer match.
        engine: runs the items elsewhere (:class:`tag2mask.jobs.ray_engine.RayEngine`, ``--engine ray``):
            ``engine.run(job) -> stats``; this process still decides what to do and records every outcome.
    """

    items: Sequence[Any]
    process: Callable[[Any], Any]
    out_dir: Path
    settings: dict[str, Any]
    options: JobOptions = field(default_factory=JobOptions)
    keys: Optional[Sequence[str]] = None
    key_fn: Callable[[Any], str] = lambda item: str(getattr(item, "name", item))
    preflight_errors: list[tuple[str, str]] = field(default_factory=list)
    describe: Optional[Callable[[int], str]] = None
    run_record: dict[str, Any] = field(default_factory=dict)
    finalize: Optional[Callable[[Path, JobSummary], None]] = None
    source_of: Optional[Callable[[int], Any]] = None
    engine: Optional[Any] = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.preflight_errors = list(self.preflight_errors)


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
    engine: Optional[Any] = None,
) -> JobSummary:
    """Process ``items`` into ``out_dir`` with resume, sharding, manifest and logs.

    The arguments are the fields of :class:`JobSpec` (``process_fn`` is its ``process``); see there.

    Raises:
        DiskFullError: the disk filled up; the job stopped at the first failed write.

    Returns:
        the :class:`JobSummary` merged over ranks (identical on every rank).
    """
    return run_job(JobSpec(items, process_fn, Path(out_dir), settings, options, keys=keys, key_fn=key_fn,
                           preflight_errors=list(preflight_errors), describe=describe,
                           run_record=run_record if run_record is not None else {}, finalize=finalize,
                           source_of=source_of, engine=engine))


def run_job(spec: JobSpec) -> JobSummary:
    """Run the job ``spec`` describes (see :func:`run_items`); the merged summary, identical on every rank."""
    info = D.dist_info()
    created = D.init_distributed(info)
    try:
        return _run(spec, info)
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


class _Job:
    """One rank's bookkeeping: which items to do, their manifest lines, log events and the bar."""

    def __init__(self, spec: JobSpec, info: D.DistInfo, n: int, shard: range, bar: Any) -> None:
        self.spec, self.info, self.shard, self.bar = spec, info, shard, bar
        self.out_dir = spec.out_dir
        items, keys = spec.items, spec.keys
        self.key_of = (lambda i: keys[i]) if keys is not None else (lambda i: spec.key_fn(items[i]))
        self.describe = spec.describe or (lambda i: f"item #{i} ({self.key_of(i)})")
        # keys of all items (every rank computes the same list) -> duplicates are found identically
        self.first_index: dict[str, int] = {}
        for i in range(n):
            self.first_index.setdefault(self.key_of(i), i)
        done_lines = latest_records([self.out_dir / MANIFEST_NAME]) if spec.options.resume else {}
        self.done = {k: r for k, r in done_lines.items() if r.get("status") == "ok"}
        self.log = JobLog(self.out_dir, info.rank, echo=spec.options.verbose, bar=bar if not bar.disable else None)
        self.manifest = RunManifest(self.out_dir, f"manifest.rank{info.rank}.jsonl")
        self.written = self.skipped = self.failed = 0
        self.failures: list[tuple[str, str]] = []

    def todo(self, i: int) -> Optional[tuple[str, Any]]:
        """``(key, source)`` when item ``i`` must be processed; ``None`` when it is a duplicate or done."""
        key = self.key_of(i)
        if self.first_index[key] != i:
            # a distinct manifest name, so this record never replaces the first item's
            self.fail(f"{key} [duplicate #{i}]", "duplicate",
                      f"{self.describe(i)}: same output name {key!r} as {self.describe(self.first_index[key])} "
                      "(e.g. a.jpg and a.png in one folder); rename one of them", duplicate_of=key)
            self.advance()
            return None
        source = _current_source(self.spec.source_of, i)
        if key in self.done:
            problem = verify_outputs(self.out_dir, self.done[key])
            if problem is None and source is not None and "source" in self.done[key] and self.done[key]["source"] != source:
                problem = "the input changed since it was processed"
            if problem is None:
                self.skipped += 1
                self.advance()
                return None
            self.log.event("redo", item=key, reason=problem)
        return key, source

    def load(self, i: int) -> Any:
        """``items[i]``; a lazily built item (e.g. a VOC annotation) that cannot load is an :class:`ItemError`."""
        try:
            return self.spec.items[i]
        except Exception as exc:
            raise ItemError(error_kind(exc, default="load"), error_message(exc)) from exc

    def fail(self, key: str, kind: str, message: str, **extra: Any) -> None:
        self.failed += 1
        if len(self.failures) < MAX_LISTED_FAILURES:
            self.failures.append((key, message))
        self.manifest.record(key, "error", error=message, error_kind=kind, rank=self.info.rank, **extra)
        self.log.event("error", item=key, kind=kind, error=message)

    def item_failed(self, key: str, failure: ItemFailure, seconds: float) -> None:
        """Record a failed item, or stop the job when the disk is full (every later item would fail too)."""
        if failure.disk_full is not None:
            err = disk_full_error(failure.disk_full, self.written)
            raise err
        extra = {"traceback": failure.traceback} if failure.traceback else {}
        self.fail(key, failure.kind, failure.message, seconds=round(seconds, 3), **extra)
        release_cuda_memory(failure.kind)

    def item_done(self, key: str, done: FinishedItem, seconds: float, source: Any) -> None:
        extra = {"source": source} if source is not None else {}
        self.manifest.record(key, "ok", outputs=done.outputs, bytes=done.sizes, sha256=done.hashes,
                             rank=self.info.rank, seconds=round(seconds, 3), **extra, **done.info)
        self.written += 1
        self.log.event("ok", item=key, seconds=round(seconds, 3))

    def advance(self) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"failed={self.failed}", refresh=False)

    def counts(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": self.skipped, "failed": self.failed, "failures": self.failures,
                "items": len(self.shard)}


def _process_serially(job: _Job, process: Callable[[Any], Any]) -> None:
    """Today's order: load, process, hash and record one item after the other, in this process."""
    for i in job.shard:
        todo = job.todo(i)
        if todo is None:
            continue
        key, source = todo
        t0 = time.time()
        try:
            done = finished_item(process(job.load(i)), job.out_dir)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one bad item never stops the job; it is reported in the manifest
            job.item_failed(key, item_failure(exc, job.out_dir), time.time() - t0)
        else:
            job.item_done(key, done, time.time() - t0, source)
        job.advance()


def _run(spec: JobSpec, info: D.DistInfo) -> JobSummary:
    from tag2mask.jobs.overlap import Stages, process_overlapped

    started = time.time()
    out_dir, options = spec.out_dir, spec.options
    prep = _collective(lambda: prepare_job_folder(out_dir, spec.settings, options.overwrite, options.resume), info)

    n = len(spec.items) if options.limit is None else max(0, min(options.limit, len(spec.items)))
    shard = range(info.rank, n, info.world_size)

    from tqdm import tqdm

    bar = tqdm(total=len(shard), desc=options.desc if info.world_size == 1 else f"{options.desc} [rank 0 of {info.world_size}]",
               unit=options.unit, disable=options.quiet or not info.is_main, file=sys.stderr, dynamic_ncols=True)
    job = _Job(spec, info, n, shard, bar)
    overlapped = isinstance(spec.process, Stages) and spec.process.workers > 0
    stats: dict[str, Any] = {}
    job.log.event("start", world_size=info.world_size, shard_items=len(shard), total_items=n, resume=options.resume,
                  workers=spec.process.workers if overlapped else 0, **prep)
    try:
        if info.is_main:
            for entry, message in spec.preflight_errors:
                job.fail(entry, "labels", message)
        if spec.engine is not None:
            stats = spec.engine.run(job)
        elif overlapped:
            stats = process_overlapped(job, spec.process)
        else:
            _process_serially(job, spec.process)
    except DiskFullError:
        raise
    except OSError as exc:  # the manifest or the log could not be written either
        full = as_disk_full_error(exc, out_dir, job.written)
        if full is None:
            raise
        raise full from exc
    finally:
        try:
            job.manifest.close()
        except OSError:
            pass
        bar.close()

    mine = job.counts()
    job.log.event("end", **{k: v for k, v in mine.items() if k != "failures"}, **stats,
                  seconds=round(time.time() - started, 3))
    job.log.close()
    per_rank = D.all_gather_object(mine)  # also the barrier: every rank has finished writing
    summary = JobSummary(
        items=n + len(spec.preflight_errors),
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
        if spec.finalize is not None:
            spec.finalize(out_dir, summary)
        record = dict(spec.run_record)
        record.update(summary.to_dict())
        record["per_rank"] = [{k: v for k, v in r.items() if k != "failures"} for r in per_rank]
        atomic_write_text(out_dir / "run.json", json.dumps(record, indent=2, default=str, ensure_ascii=False))
        return summary.manifest_counts

    summary.manifest_counts = _collective(finish, info)
    return summary


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
