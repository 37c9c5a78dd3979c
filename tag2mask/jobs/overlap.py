"""Overlapped batch jobs: CPU stages in worker processes, the device stage batched in this process.

A command that splits its per-item work into three stages hands the runner a :class:`Stages`
object instead of a plain function::

    prepare(item)      -> prepared    worker processes   (decode, resize: CPU)
    compute([prepared]) -> [computed]  this process        (the model, batched on the device)
    finish(computed)   -> outputs     worker processes   (refinement, encoding, atomic writes: CPU)

With ``workers == 0`` the three run one item after the other in this process (exactly the serial
job). With ``workers > 0`` a pool of that many processes runs ``prepare`` and ``finish`` while this
process runs ``compute`` on batches of ``batch_size`` items, so the device never waits for the CPU
work of other items and the CPU work of one item overlaps the device work of the next. Everything
streams: at most ``queue_size`` items are between the first and the last stage at any time, so
memory does not grow with the data set.

What does not change: every manifest line, log event and progress update is made here, by the
runner's bookkeeping; an item is recorded only after its outputs are written and hashed (in the
worker); a failure in any stage becomes that item's error record (a batch that fails in
``compute`` is retried item by item, so one bad item does not fail its batch); a full disk stops
the job at once; ``kill -9`` of the job leaves what it leaves in the serial case (workers exit when
this process dies). A worker that dies (a crash or the out-of-memory killer) is replaced; the items
it may have held are run again one at a time, so the item that kills a worker is found and
recorded as a ``worker_crashed`` error and the others are not lost.

Worker processes are started with the ``forkserver`` method: one clean interpreter (no threads,
no CUDA context) imports ``preload`` once and forks the workers, which start in milliseconds.
``prepare`` and ``finish`` must therefore be picklable (module-level functions or instances of
module-level classes); they are sent to each worker once, when it starts.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

__all__ = ["Stages", "default_workers", "usable_cpus", "process_overlapped", "start_worker_server"]

#: at most this many worker processes by default (each holds its own copy of the libraries)
MAX_DEFAULT_WORKERS = 16
#: with the model on the CPU, below this many CPUs the model's threads already fill the machine: measured on
#: 2 cores, the workers' CPU stages then mostly compete with it (docs/benchmarks.md), so the default is 0
MIN_CPUS_FOR_CPU_MODEL = 4


def usable_cpus(local_world_size: Optional[int] = None) -> int:
    """The CPUs this process may use, shared by the torchrun ranks of its node (``LOCAL_WORLD_SIZE``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, local_world_size))


def default_workers(device_type: str = "cuda", local_world_size: Optional[int] = None) -> int:
    """A worker count for this machine: the usable CPUs (:func:`usable_cpus`) minus one for the process
    that drives the model, at most :data:`MAX_DEFAULT_WORKERS`.

    0 (the serial path) on a single CPU, and when the model runs on the CPU (``device_type`` ``"cpu"``)
    with fewer than :data:`MIN_CPUS_FOR_CPU_MODEL` CPUs.
    """
    cpus = usable_cpus(local_world_size)
    if device_type == "cpu" and cpus < MIN_CPUS_FOR_CPU_MODEL:
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, cpus - 1))


@dataclass
class Stages:
    """A job's per-item work as ``prepare`` -> ``compute`` (batched) -> ``finish``.

    Attributes:
        prepare: ``item -> prepared`` (runs in a worker; picklable).
        compute: ``[prepared, ...] -> [computed, ...]`` one result per input, same order (runs in this
            process; the device stage).
        finish: ``computed -> output paths | ItemOutput`` (runs in a worker; picklable); writes the
            item's files atomically.
        workers: worker processes; 0 runs the three stages item by item in this process.
        batch_size: items per ``compute`` call.
        queue_size: most items in flight between the stages (default ``2 * workers + 2 * batch_size``).
        preload: modules the worker processes import once, before the first item.
        worker_threads: torch / OpenMP threads per worker.
    """

    prepare: Callable[[Any], Any]
    compute: Callable[[Sequence[Any]], Sequence[Any]]
    finish: Callable[[Any], Any]
    workers: int = 0
    batch_size: int = 1
    queue_size: Optional[int] = None
    preload: tuple[str, ...] = field(default_factory=tuple)
    worker_threads: int = 1

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def __call__(self, item: Any) -> Any:
        """The serial path: all three stages for one item, in this process."""
        return self.finish(self.compute([self.prepare(item)])[0])

    @property
    def capacity(self) -> int:
        return self.queue_size or 2 * self.workers + 2 * self.batch_size


# ---- inside a worker process -------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _parent_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie -- killed, not yet reaped -- counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal-0 test above is all there is


def _watch_parent(pid: int, interval: float = 0.5) -> None:
    """Exit this worker as soon as the job's process is gone (``kill -9`` of the job leaves no orphans)."""
    import threading

    def watch() -> None:
        while _parent_alive(pid):
            time.sleep(interval)
        os._exit(1)  # nothing to clean up: outputs are written atomically, the job records nothing more

    threading.Thread(target=watch, name="tag2mask-parent-watchdog", daemon=True).start()


def _init_worker(prepare: Callable, finish: Callable, out_dir: str, threads: int, parent_pid: int) -> None:
    import signal

    # the worker's parent is the fork server, not the job: watch the job itself
    _watch_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the job's process stops the workers (no traceback per worker)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:  # preloaded: its thread pool is not started yet, only sized
        sys.modules["torch"].set_num_threads(threads)
    _WORKER.update(prepare=prepare, finish=finish, out_dir=out_dir)


def _in_worker(stage: str, payload: Any) -> tuple[str, Any]:
    """Run one stage on one item; never raises: ``("ok", value)`` or ``("error", ItemFailure)``."""
    from pathlib import Path

    from tag2mask.jobs.items import finished_item, item_failure

    out_dir = Path(_WORKER["out_dir"])
    try:
        if stage == "prepare":
            return "ok", _WORKER["prepare"](payload)
        return "ok", finished_item(_WORKER["finish"](payload), out_dir)  # hashed here, off the main process
    except Exception as exc:
        return "error", item_failure(exc, out_dir)


# ---- in the job's process ----------------------------------------------------------------------------


@dataclass
class _Ticket:
    """One item on its way through the stages."""

    index: int
    key: str
    source: Any
    started: float
    stage: str = "prepare"
    payload: Any = None  # what the pending worker task was given (kept to rerun it after a crash)
    future: Optional[Future] = None
    suspect: bool = False  # was in a worker that died


def _start_method() -> str:
    # forkserver where the platform has it (Linux, macOS); Windows only has spawn (slower start, same results)
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def start_worker_server(preload: Sequence[str] = ()) -> None:
    """Start the process that forks the workers now, so that its imports overlap the caller's start-up.

    Commands call it before loading their model; :func:`process_overlapped` starts it otherwise.
    Only the first call's ``preload`` counts (the server lives as long as this process).
    """
    if _start_method() != "forkserver":
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tag2mask.jobs.items", "tag2mask.jobs.overlap", *preload])
    from multiprocessing import forkserver

    forkserver.ensure_running()


class _Pool:
    """A process pool that can be replaced when a worker dies."""

    def __init__(self, stages: Stages, out_dir: str) -> None:
        self.stages, self.out_dir = stages, out_dir
        start_worker_server(stages.preload)
        self.ctx = multiprocessing.get_context(_start_method())
        self.executor = self.start()

    def start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.stages.workers, mp_context=self.ctx, initializer=_init_worker,
                                   initargs=(self.stages.prepare, self.stages.finish, self.out_dir,
                                             self.stages.worker_threads, os.getpid()))

    def submit(self, ticket: _Ticket) -> None:
        try:
            ticket.future = self.executor.submit(_in_worker, ticket.stage, ticket.payload)
        except BrokenProcessPool:  # a worker died while the pool was idle: nothing was lost
            self.executor.shutdown(wait=True)
            self.executor = self.start()
            ticket.future = self.executor.submit(_in_worker, ticket.stage, ticket.payload)

    def close(self, kill: bool = False) -> None:
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=not kill, cancel_futures=True)
        if kill:
            for proc in processes:  # a job stopped by an error or Ctrl-C does not wait for running items
                if proc.is_alive():
                    proc.kill()
            for proc in processes:
                proc.join(timeout=5)


def process_overlapped(job: Any, stages: Stages) -> dict[str, int]:
    """Run ``job``'s shard through ``stages`` with ``stages.workers`` worker processes.

    ``job`` is the runner's bookkeeping (``tag2mask.jobs.runner._Job``): it decides what to do
    (``todo``), loads items, and records every outcome. Returns ``{"peak_in_flight": n}``, the most
    items that were between the first and the last stage at once (for the log).
    """
    pool = _Pool(stages, str(job.out_dir))
    scheduler = _Scheduler(job, stages, pool)
    try:
        scheduler.run()
    except BaseException:
        pool.close(kill=True)
        raise
    pool.close()
    return {"peak_in_flight": scheduler.peak}


class _Scheduler:
    """The items of one :func:`process_overlapped` call on their way through the pool and the device stage.

    Items are ``preparing`` (in item order), then in the device ``batch``, then ``finishing``; items
    whose worker died wait in ``suspects`` and are rerun one at a time.
    """

    def __init__(self, job: Any, stages: Stages, pool: "_Pool") -> None:
        self.job, self.stages, self.pool = job, stages, pool
        self.pending = iter(job.shard)
        self.exhausted = False
        self.preparing: collections.deque[_Ticket] = collections.deque()  # in item order
        self.batch: list[_Ticket] = []
        self.finishing: dict[Future, _Ticket] = {}
        self.suspects: collections.deque[_Ticket] = collections.deque()
        self.peak = 0

    def run(self) -> None:
        """Feed, collect, compute and wait until every item of the shard is recorded."""
        while True:
            # 1. feed the pool: suspects alone, one at a time; otherwise new items up to the capacity
            self._feed()
            self.peak = max(self.peak, self._in_flight())
            # 2. results of the pool, prepared items in item order (batches do not depend on timing)
            done = {f for f in self.finishing if f.done()} | {t.future for t in self.preparing if t.future.done()}
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                self._worker_died()
                continue
            for future in [f for f in self.finishing if f in done]:  # this snapshot only: no race with the pool
                self._collect(self.finishing.pop(future))
            while self.preparing and self.preparing[0].future in done:
                self._collect(self.preparing.popleft())
            # 3. the device stage, when a batch is full or nothing more can join it
            batch = self.batch
            if batch and (len(batch) >= self.stages.batch_size or not self.preparing):
                ready, batch[:] = batch[: self.stages.batch_size], batch[self.stages.batch_size:]
                self._compute(ready)
                continue
            if not self.preparing and not self.finishing and not batch and not self.suspects and self.exhausted:
                break
            # 4. wait for the next item in order, or for any item to finish
            waiting = ([self.preparing[0].future] if self.preparing else []) + list(self.finishing)
            if waiting:
                wait(waiting, return_when=FIRST_COMPLETED)

    def _in_flight(self) -> int:
        return len(self.preparing) + len(self.batch) + len(self.finishing)

    def _feed(self) -> None:
        from tag2mask.jobs.items import item_failure

        if self.suspects:
            if not self.preparing and not self.finishing:
                ticket = self.suspects.popleft()
                self._send(ticket, ticket.stage, ticket.payload)
            return
        job = self.job
        while not self.exhausted and self._in_flight() < self.stages.capacity:
            i = next(self.pending, None)
            if i is None:
                self.exhausted = True
                break
            todo = job.todo(i)
            if todo is None:
                continue
            ticket = _Ticket(i, todo[0], todo[1], time.time())
            try:
                item = job.load(i)
            except Exception as exc:
                self._fail(ticket, item_failure(exc, job.out_dir))
                continue
            self._send(ticket, "prepare", item)

    def _fail(self, ticket: _Ticket, failure: Any) -> None:
        self.job.item_failed(ticket.key, failure, time.time() - ticket.started)
        self.job.advance()

    def _send(self, ticket: _Ticket, stage: str, payload: Any) -> None:
        ticket.stage, ticket.payload = stage, payload
        self.pool.submit(ticket)
        if stage == "prepare":
            self.preparing.append(ticket)
        else:
            self.finishing[ticket.future] = ticket

    def _compute(self, tickets: list[_Ticket]) -> None:
        from tag2mask.jobs.items import release_cuda_memory, error_kind, item_failure

        try:
            results = list(self.stages.compute([t.payload for t in tickets]))
            if len(results) != len(tickets):
                raise RuntimeError(f"compute returned {len(results)} results for {len(tickets)} items")
        except Exception as exc:
            release_cuda_memory(error_kind(exc))  # a batch that ran out of GPU memory may fit one by one
            if len(tickets) > 1:  # find the item that fails; the others go on
                for ticket in tickets:
                    self._compute([ticket])
                return
            self._fail(tickets[0], item_failure(exc, self.job.out_dir))
            return
        for ticket, result in zip(tickets, results):
            self._send(ticket, "finish", result)

    def _collect(self, ticket: _Ticket) -> None:
        """A worker task of ``ticket`` is done (and its worker alive): record it or move it on."""
        from tag2mask.jobs.items import item_failure

        error = ticket.future.exception()
        if error is not None:  # the task could not reach its worker or come back (e.g. pickling)
            ticket.future = None
            try:
                raise error
            except Exception as exc:
                self._fail(ticket, item_failure(exc, self.job.out_dir))
            return
        status, value = ticket.future.result()
        ticket.future = None
        if status == "error":
            self._fail(ticket, value)
        elif ticket.stage == "prepare":
            ticket.payload = value
            self.batch.append(ticket)
        else:
            self.job.item_done(ticket.key, value, time.time() - ticket.started, ticket.source)
            self.job.advance()

    def _worker_died(self) -> None:
        """Replace the broken pool; rerun the items it lost one at a time, to find the one that kills workers."""
        from tag2mask.jobs.items import ItemFailure

        pool = self.pool
        pool.executor.shutdown(wait=True)  # a broken pool settles every future and stops its workers
        lost = [t for t in list(self.preparing) + list(self.finishing.values()) if t.future.exception() is not None]
        for ticket in lost:
            if ticket.stage == "prepare":
                self.preparing.remove(ticket)
            else:
                del self.finishing[ticket.future]
            ticket.future = None
        pool.executor = pool.start()
        for ticket in lost:
            if ticket.suspect:  # it ran alone and its worker died
                self._fail(ticket, ItemFailure(
                    "worker_crashed", f"{self.job.describe(ticket.index)}: a worker process died while processing "
                    "this item (a crash in a library, or killed by the system, e.g. out of memory), in its "
                    f"{ticket.stage} stage"))
            else:
                ticket.suspect = True
                self.suspects.append(ticket)
