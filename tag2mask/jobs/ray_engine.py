"""The Ray Data engine of batch jobs (``--engine ray``): items run in Ray actors that keep the model loaded.

The runner (:mod:`tag2mask.jobs.runner`) still decides what to do and records what was done: it lists the
items its manifest does not already hold as finished (``--resume``), and writes every manifest line, log
event and progress update itself, in the driver. Ray only carries the work:

* a Ray Data stage reads each image's **bytes** (CPU tasks of :data:`READ_CPUS` CPU each, so that reads never
  wait for the actors' CPUs: with whole CPUs, 2 actors + reads on 2 CPUs deadlocked in the prototype);
* ``workers`` actors (:class:`_ItemActor`), each building **its own** model once, inside the actor, from
  ``builder(build_args)``: the command's already-checked arguments, never a built model (CLIP-ES objects
  cannot be pickled, and a model sent by value would be copied through the object store anyway);
* each actor decodes the bytes with *our* decoder (:func:`tag2mask.data.images.load_image`; Ray's
  ``read_images`` rotates, converts and fails differently), runs the command's stages, writes the outputs
  with our atomic writers, hashes them and returns the outcome as plain data.

Ray Data has no job checkpointing of its own that knows our outputs: a killed run is continued with
``--resume``, which skips what the manifest records as finished (the files written but not yet recorded
when the driver died are redone). Nothing here is imported unless ``--engine ray`` is asked for, and ray
itself is imported only inside the functions below.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["RayEngine", "READ_CPUS", "import_ray", "actor_threads"]

#: CPUs Ray reserves for one read task (reading bytes is I/O; whole CPUs would starve the actors)
READ_CPUS = 0.05
#: of the CPUs per actor, the share Ray reserves for it (the rest keeps room for the read tasks)
ACTOR_CPU_SHARE = 0.9


def import_ray() -> Any:
    """``ray`` (with ``ray.data``), or a one-line error telling how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library is the extra's part that matters)
    except ImportError as exc:
        raise ValueError("--engine ray needs Ray Data: pip install 'tag2mask[ray]' (or 'ray[data]'); "
                         f"it is not installed here ({exc})") from None
    return ray


def actor_threads(cpus: float, workers: int) -> int:
    """torch / OpenMP threads per actor: the CPUs divided by the actors, at least 1.

    Set deliberately: Ray would set ``OMP_NUM_THREADS`` from the actor's CPU reservation, and torch's own
    default (every core in every process) oversubscribes a loaded machine (14x the CPU time measured, #28).
    """
    return max(1, int(cpus // max(1, workers)))


def _load(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _read_bytes(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data stage: the image's bytes (``readable`` False when it cannot be read: the actor's decoder
    then reports the problem exactly as the local engine does)."""
    from tag2mask.io.uri_inputs import is_uri, read_uri

    path = row["path"]
    data, readable = b"", False
    if path:
        try:
            if is_uri(path):  # an object store's key (s3://, gs://, file://): through pyarrow.fs, as Ray Data reads
                data, readable = read_uri(path), True
            else:
                with open(path, "rb") as f:
                    data, readable = f.read(), True
        except (OSError, ValueError, ImportError):
            pass
    return {"index": row["index"], "data": data, "readable": readable}


class _ItemActor:
    """One Ray actor: builds the command's item list and per-item function once, then runs items."""

    def __init__(self, builder: str, build_args: Any, threads: int, out_dir: str) -> None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        self.out_dir = Path(out_dir)
        self.items, self.process = _load(builder)(build_args)

    def _one(self, index: int, data: Optional[bytes]) -> dict[str, Any]:
        from tag2mask.jobs.items import ItemError, error_kind, error_message, finished_item, item_failure

        t0 = time.time()
        try:
            try:
                item = self.items[index]
            except Exception as exc:  # a lazily built item that cannot load, as in the local engine
                raise ItemError(error_kind(exc, default="load"), error_message(exc)) from exc
            done = finished_item(self.process(item, data), self.out_dir)
        except Exception as exc:  # one bad item never stops the job; it is reported in the manifest
            return {"failure": item_failure(exc, self.out_dir).__dict__, "seconds": time.time() - t0}
        return {"done": done.__dict__, "seconds": time.time() - t0}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        results = [json.dumps(self._one(int(i), bytes(d) if ok else None), default=str)
                   for i, d, ok in zip(batch["index"], batch["data"], batch["readable"])]
        return {"index": np.asarray(batch["index"], dtype=np.int64), "result": np.asarray(results, dtype=object)}


@dataclass
class RayEngine:
    """How ``--engine ray`` runs a job's items.

    Attributes:
        builder: ``"module:function"``; ``function(build_args) -> (items, process)`` runs in each actor and
            builds the same item list as the driver's and ``process(item, data) -> outputs | ItemOutput``
            (``data``: the item's input bytes, or ``None`` to read them itself).
        build_args: what the builder needs (picklable: the command's checked arguments).
        input_path: ``item -> path`` of the file whose bytes Ray Data reads (runs in the driver).
        address: a Ray cluster to join (``ray start --head`` prints it); ``None`` starts a local one.
        workers: actors (each with its own model); ``None``: one per GPU with GPUs, else the CPUs / 2.
        num_gpus_per_worker: GPUs (or a fraction) Ray reserves for each actor.
    """

    builder: str
    build_args: Any
    input_path: Callable[[Any], Any]
    address: Optional[str] = None
    workers: Optional[int] = None
    num_gpus_per_worker: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def _start(self, ray: Any) -> tuple[float, int]:
        """Start or join Ray; ``(CPUs, actors)``."""
        t0 = time.time()
        if self.address is None:
            from tag2mask.jobs.overlap import usable_cpus

            ray.init(num_cpus=usable_cpus(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        self.stats["ray_start_seconds"] = round(time.time() - t0, 3)
        import logging

        # the runner's bar and log already report progress; Ray Data's own would interleave on stderr
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cpus = float(ray.cluster_resources().get("CPU", 1))
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if self.workers is not None:
            workers = self.workers
        elif self.num_gpus_per_worker > 0 and gpus > 0:
            workers = max(1, int(gpus // self.num_gpus_per_worker))
        else:
            workers = max(1, int(cpus // 2))
        return cpus, workers

    def _paths(self, job: Any, todo: dict[int, Any]) -> list[dict[str, Any]]:
        rows = []
        for i in todo:
            try:
                path = str(self.input_path(job.spec.items[i]))
            except Exception:  # the actor loads the item again and reports why it cannot
                path = ""
            rows.append({"index": i, "path": path})
        return rows

    def run(self, job: Any) -> dict[str, Any]:
        """Process the job's unfinished items through Ray; the runner's ``job`` records each outcome."""
        from tag2mask.jobs.items import FinishedItem, ItemFailure

        todo = {}
        for i in job.shard:
            t = job.todo(i)
            if t is not None:
                todo[i] = t
        if not todo:
            return {"engine": "ray"}
        listed = len(job.failures)  # failures listed so far (label-file problems, duplicates), in item order
        ray = import_ray()
        cpus, workers = self._start(ray)
        threads = actor_threads(cpus, workers)
        self.stats.update(engine="ray", ray_workers=workers, ray_threads_per_worker=threads, ray_cpus=cpus)
        try:
            ds = ray.data.from_items(self._paths(job, todo))
            ds = ds.map(_read_bytes, num_cpus=READ_CPUS)
            ds = ds.map_batches(
                _ItemActor, fn_constructor_args=(self.builder, self.build_args, threads, str(job.out_dir)),
                batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=max(READ_CPUS, ACTOR_CPU_SHARE * cpus / workers), num_gpus=self.num_gpus_per_worker)
            first: list[tuple[int, str, str]] = []  # the failures of the lowest item indices (a bounded heap)
            for row in ds.iter_rows():
                index = int(row["index"])
                key, source = todo[index]
                result = json.loads(row["result"])
                if "done" in result:
                    job.item_done(key, FinishedItem(**result["done"]), result["seconds"], source)
                else:
                    failure = ItemFailure(**result["failure"])
                    job.item_failed(key, failure, result["seconds"])
                    _keep_first(first, (-index, key, failure.message))
                job.advance()
        finally:
            ray.shutdown()
        # items finish in any order; the summary lists the first failures in item order, as the local engine does
        job.failures[listed:] = [(k, m) for _, k, m in sorted(first, reverse=True)][:max(0, len(job.failures) - listed)]
        return dict(self.stats)


def _keep_first(heap: list[tuple[int, str, str]], entry: tuple[int, str, str]) -> None:
    """Keep the runner's number of listed failures, those of the lowest indices (``entry[0]`` is ``-index``)."""
    import heapq

    from tag2mask.jobs.runner import MAX_LISTED_FAILURES

    heapq.heappush(heap, entry)
    if len(heap) > MAX_LISTED_FAILURES:
        heapq.heappop(heap)
