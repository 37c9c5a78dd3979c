"""The overlapped runner (``tag2mask.jobs.overlap``) on its own, with plain picklable stages: the same
manifest and files as the serial path, batches in item order, bounded queues, every failure recorded
against its item (in any stage, including a worker that dies), and a full disk stops the job.

The stage functions live at module level so that the worker processes can import them.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from tag2mask.io.atomic import atomic_write_text
from tag2mask.jobs import ItemError, JobOptions, JobSpec, Stages, run_items, run_job
from tag2mask.jobs.items import DiskFullError

VOLATILE = ("time", "seconds", "rank", "traceback")  # tracebacks name the path the error took


def prepare(item: str) -> dict:
    if item.startswith("bad-prepare"):
        raise ItemError("decode", f"{item}: cannot be decoded on purpose")
    if item.startswith("boom-prepare"):
        raise RuntimeError("prepare exploded")
    return {"name": item, "pid": os.getpid()}


class Compute:
    """The device stage: runs in the job's process, so it can keep a log of its batches."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, batch):
        names = [p["name"] for p in batch]
        self.batches.append(names)
        if any(n.startswith("bad-compute") for n in names):
            raise ValueError(f"compute refuses {names}")
        return [{**p, "upper": p["name"].upper()} for p in batch]


class Finish:
    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, computed: dict):
        name = computed["name"]
        if name.startswith("crash"):
            os._exit(7)  # a worker killed mid-item, as a segfault or the OOM killer would
        if name.startswith("full"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "txt" / f"{name}.txt"))
        path = self.out / "txt" / f"{name}.txt"
        atomic_write_text(path, computed["upper"] * 2)
        from tag2mask.jobs.items import ItemOutput

        return ItemOutput([path], {"length": len(name)})


def _stages(out: Path, workers: int, batch_size: int = 1, queue_size=None) -> Stages:
    return Stages(prepare, Compute(), Finish(out), workers=workers, batch_size=batch_size, queue_size=queue_size)


def _manifest(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in
            (out / "manifest.jsonl").read_text().splitlines()]


def _log(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "logs" / "rank0.log").read_text().splitlines()]


ITEMS = ["a", "b", "bad-prepare-1", "c/d", "boom-prepare", "e", "bad-compute", "f", "g", "a", "h", "i", "j"]


def test_overlapped_equals_serial(tmp_path):
    outs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        stages = _stages(out, workers, batch_size=3)
        summary = run_items(ITEMS, stages, out, {"v": 1}, JobOptions(quiet=True), key_fn=str)
        assert (summary.written, summary.failed) == (9, 4), workers
        outs[workers] = out
    assert _manifest(outs[0]) == _manifest(outs[2])
    recs = {r["item"]: r for r in _manifest(outs[2])}
    assert recs["bad-prepare-1"]["error_kind"] == "decode" and "on purpose" in recs["bad-prepare-1"]["error"]
    assert recs["boom-prepare"]["error_kind"] == "internal" and "prepare exploded" in recs["boom-prepare"]["error"]
    raw = {json.loads(l)["item"]: json.loads(l) for l in (outs[2] / "manifest.jsonl").read_text().splitlines()}
    assert "RuntimeError" in raw["boom-prepare"]["traceback"]
    assert recs["bad-compute"]["error_kind"] == "internal" and "compute refuses" in recs["bad-compute"]["error"]
    assert recs["a [duplicate #9]"]["error_kind"] == "duplicate"
    assert recs["c/d"]["outputs"] == ["txt/c/d.txt"] and recs["c/d"]["length"] == 3
    for name in ("a", "c/d", "j"):
        assert (outs[2] / "txt" / f"{name}.txt").read_text() == name.upper() * 2
    start = _log(outs[2])[0]
    assert start["event"] == "start" and start["workers"] == 2


def test_batches_follow_item_order_and_a_failing_batch_is_retried_item_by_item(tmp_path):
    stages = _stages(tmp_path / "o", workers=2, batch_size=3)
    run_items(ITEMS, stages, tmp_path / "o", {}, JobOptions(quiet=True), key_fn=str)
    batches = stages.compute.batches
    # items that passed prepare, in order, three at a time; the batch holding bad-compute is retried alone
    assert batches[0] == ["a", "b", "c/d"]
    assert batches[1] == ["e", "bad-compute", "f"] and batches[2:5] == [["e"], ["bad-compute"], ["f"]]
    assert batches[5:] == [["g", "h", "i"], ["j"]]


def test_queues_are_bounded(tmp_path):
    items = [f"x{i:03d}" for i in range(60)]
    stages = _stages(tmp_path / "o", workers=2, batch_size=2, queue_size=5)
    summary = run_items(items, stages, tmp_path / "o", {}, JobOptions(quiet=True), key_fn=str)
    assert summary.written == 60
    end = _log(tmp_path / "o")[-1]
    assert end["event"] == "end" and 2 <= end["peak_in_flight"] <= 5


def test_resume_across_serial_and_overlapped_runs(tmp_path):
    out = tmp_path / "o"
    items = [f"y{i}" for i in range(8)]
    run_items(items, _stages(out, 0), out, {"v": 1}, JobOptions(quiet=True, limit=3), key_fn=str)
    stages = _stages(out, workers=2)
    summary = run_items(items, stages, out, {"v": 1}, JobOptions(quiet=True, resume=True), key_fn=str)
    assert (summary.skipped, summary.written) == (3, 5)
    assert sorted(n for b in stages.compute.batches for n in b) == items[3:]


def test_a_worker_that_dies_fails_only_its_item(tmp_path):
    out = tmp_path / "o"
    items = ["a", "b", "c", "crash-me", "d", "e", "f", "g"]
    summary = run_items(items, _stages(out, workers=2), out, {}, JobOptions(quiet=True), key_fn=str)
    recs = {r["item"]: r for r in _manifest(out)}
    assert recs["crash-me"]["status"] == "error" and recs["crash-me"]["error_kind"] == "worker_crashed"
    assert "worker process died" in recs["crash-me"]["error"] and "finish stage" in recs["crash-me"]["error"]
    assert summary.written == 7 and summary.failed == 1
    assert all(recs[n]["status"] == "ok" for n in items if n != "crash-me")


def test_disk_full_in_a_worker_stops_the_job(tmp_path):
    out = tmp_path / "o"
    items = ["a", "b", "full", "c", "d", "e", "f", "g", "h"]
    with pytest.raises(DiskFullError) as info:
        run_items(items, _stages(out, workers=2, queue_size=2), out, {}, JobOptions(quiet=True), key_fn=str)
    message = str(info.value)
    assert str(out / "txt" / "full.txt") in message and "--resume" in message
    recs = {json.loads(l)["item"]: json.loads(l) for l in (out / "manifest.rank0.jsonl").read_text().splitlines()}
    assert "full" not in recs and all(r["status"] == "ok" for r in recs.values())
    assert len(recs) <= 4  # stopped at once: at most the items already in flight were recorded


def test_job_spec_is_what_run_items_builds(tmp_path):
    out = tmp_path / "o"
    seen = []

    def process(item):
        seen.append(item)
        path = out / f"{item}.txt"
        atomic_write_text(path, item)
        return [path]

    spec = JobSpec(["p", "q"], process, out, {"v": 3}, JobOptions(quiet=True), key_fn=str,
                   source_of=lambda i: {"index": i}, run_record={"command": "test"})
    summary = run_job(spec)
    assert summary.written == 2 and seen == ["p", "q"]
    assert json.loads((out / "run.json").read_text())["command"] == "test"
    assert [r["source"] for r in _manifest(out)] == [{"index": 0}, {"index": 1}]


def test_stages_validate_their_settings():
    with pytest.raises(ValueError):
        Stages(prepare, Compute(), Finish(Path(".")), workers=-1)
    with pytest.raises(ValueError):
        Stages(prepare, Compute(), Finish(Path(".")), batch_size=0)


def test_default_workers(monkeypatch):
    from tag2mask.jobs import overlap

    def cpus(n):
        monkeypatch.setattr(overlap.os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpus(16)
    assert overlap.default_workers("cuda") == 15 and overlap.default_workers("cpu") == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks share the node's CPUs
    assert overlap.default_workers("cuda") == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    cpus(2)  # a GPU box with 2 vCPUs still overlaps; a 2-core CPU run stays serial (measured: no gain)
    assert overlap.default_workers("cuda") == 1 and overlap.default_workers("cpu") == 0
    cpus(1)
    assert overlap.default_workers("cuda") == 0
    cpus(64)
    assert overlap.default_workers("cuda") == overlap.MAX_DEFAULT_WORKERS
