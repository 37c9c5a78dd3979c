"""The training engine (tag2mask.engine.loop) on a toy task: resume, logs, run folders, safety, DDP.

The toy task (tests/_toy_tasks.py) has dropout, extra checkpointed state and a phase switch, so an
exact resume needs every piece of state the engine saves.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _toy_tasks import ToyTask
from tag2mask.jobs.checkpoint import (
    RECORD, DiskFullError, UnsafeCheckpointError, latest_checkpoint, load_checkpoint, load_latest_checkpoint,
)
from tag2mask.engine.loop import RunOptions, TrainingDiverged, train
from tag2mask.runs.layout import RunFolderError, read_run_checkpoint
from tag2mask.engine.logs import read_events, read_log

REPO = Path(__file__).resolve().parents[1]


def _opts(out: Path, **kw) -> RunOptions:
    base = dict(out_dir=str(out), device="cpu", seed=3, ckpt_every=4, log_every=1, val_every=4, progress=False)
    base.update(kw)
    return RunOptions(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_run_checkpoint(run, task="toy")["modules"]["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _losses(run: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_log(run / "train_log.csv")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted reference run: 12 iterations, phase switch at 6, checkpoints every 4."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(ToyTask(), _opts(out))
    return out


@pytest.mark.parametrize("stop", [3, 8])  # before and after the phase switch at iteration 6
def test_resumed_run_equals_uninterrupted(tmp_path, straight, stop):
    part = tmp_path / "part"
    first = ToyTask()
    train(first, _opts(part, stop_at=stop))
    second = ToyTask()
    s = train(second, _opts(part, resume="auto"))
    assert s["start_iteration"] == stop and s["iterations"] == 12
    _assert_same_weights(straight, part)
    assert _losses(part) == _losses(straight)  # bitwise, every iteration
    # the phase switch happened at the configured iteration in both halves
    assert first.phases + second.phases == [0] * 6 + [1] * 6
    phases = [r["phase"] for r in read_log(part / "train_log.csv")]
    assert phases == [0] * 6 + [1] * 6
    assert [e["event"] for e in read_events(part / "train_log.jsonl")] == ["start", "stop", "resume", "stop"]


def test_damaged_newest_checkpoint_resumes_from_the_previous_one_and_keeps_the_log(tmp_path, straight):
    run = tmp_path / "run"
    train(ToyTask(), _opts(run, stop_at=7))  # checkpoints at 4 and 7, log rows 1..7
    newest = run / "ckpt_0000007.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # cut, as by a crash of the disk
    with open(run / "train_log.csv") as f:
        before = f.read()
    s = train(ToyTask(), _opts(run, resume="auto"))
    assert s["start_iteration"] == 4
    with open(run / "train_log.csv") as f:
        after = f.read()
    assert after.startswith(before)  # appended, never truncated
    rows = list(read_log(run / "train_log.jsonl"))
    assert [r["iteration"] for r in rows] == list(range(1, 13))
    assert [r["session"] for r in rows] == [0] * 4 + [1] * 8  # the latest row of 5..7 is the resumed one
    _assert_same_weights(straight, run)
    assert _losses(run) == _losses(straight)


def test_kill_during_a_checkpoint_save_resumes_from_the_newest_complete_one(tmp_path, straight):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    res = subprocess.run([sys.executable, str(REPO / "tests" / "_toy_tasks.py"), str(run), "--kill-in-save", "2"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 137, res.stderr[-2000:]
    temps = [p for p in run.iterdir() if ".tmp" in p.name]
    assert temps, "the killed process should have left its half-written temporary file"
    assert latest_checkpoint(run)[1] == 4
    logged = _losses(run)
    assert sorted(logged) == list(range(1, 9))

    s = train(ToyTask(), _opts(run, resume="auto"))
    assert s["start_iteration"] == 4  # not 0
    assert not [p for p in run.iterdir() if ".tmp" in p.name]  # stale temporary files removed
    with open(run / "train_log.jsonl") as f:
        first_rows = [json.loads(line) for line in f][1:9]
    assert [r["iteration"] for r in first_rows] == list(range(1, 9))  # the history before the kill is kept
    _assert_same_weights(straight, run)
    assert _losses(run) == _losses(straight)


def test_run_folder_is_never_silently_overwritten(tmp_path):
    run = tmp_path / "run"
    train(ToyTask(iters=4), _opts(run))
    first = _weights(run)
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        train(ToyTask(iters=4, lr=0.2), _opts(run))
    assert all(torch.equal(first[k], _weights(run)[k]) for k in first)
    with pytest.raises(RunFolderError, match="exclude"):
        train(ToyTask(iters=4), _opts(run, resume="auto", overwrite=True))
    # a resume with another recipe is refused instead of mixing two recipes in one run
    with pytest.raises(RunFolderError, match="different settings.*lr"):
        train(ToyTask(iters=4, lr=0.2), _opts(run, resume="auto"))
    # an unrelated non-empty folder is refused too
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError):
        train(ToyTask(iters=4), _opts(other))
    # --overwrite starts again: old checkpoints and logs are gone, other files stay
    (run / "notes.txt").write_text("mine")
    train(ToyTask(iters=2, lr=0.2), _opts(run, overwrite=True, ckpt_every=1))
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_0000001.pt", "ckpt_0000002.pt"]
    assert [r["iteration"] for r in read_log(run / "train_log.csv")] == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_without_a_complete_checkpoint_refuses_to_restart_from_zero(tmp_path):
    run = tmp_path / "run"
    train(ToyTask(iters=4), _opts(run, ckpt_every=100, stop_at=3))  # one checkpoint, at the stop
    for p in run.glob("ckpt_*.pt"):
        p.write_bytes(b"x")  # damaged
    with pytest.raises(RunFolderError, match="nothing to resume"):
        train(ToyTask(iters=4), _opts(run, resume="auto"))
    # an empty or missing folder: --resume starts the run (what job scripts that always pass --resume need)
    s = train(ToyTask(iters=2), _opts(tmp_path / "fresh", resume="auto"))
    assert s["start_iteration"] == 0 and s["iterations"] == 2


class _CreatesAFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _plant_malicious_checkpoint(run: Path, target: Path) -> Path:
    """A recorded, hash-verified checkpoint whose unpickling would create ``target``."""
    from tag2mask.io.manifest import RunManifest, file_sha256

    run.mkdir(parents=True, exist_ok=True)
    path = run / "ckpt_0000004.pt"
    torch.save({"format": "tag2mask-train-v2", "task": "toy", "payload": _CreatesAFile(target)}, path)
    with RunManifest(run, RECORD) as rec:
        rec.record(path.name, "ok", outputs=[path.name], bytes=[path.stat().st_size], sha256=[file_sha256(path)], step=4)
    # the file really is malicious: a plain unpickle would create the target
    assert not target.exists()
    return path


def test_malicious_checkpoint_is_never_unpickled(tmp_path):
    target = tmp_path / "pwned"
    run = tmp_path / "run"
    _plant_malicious_checkpoint(run, target)
    with pytest.raises(UnsafeCheckpointError, match="never unpickles"):
        train(ToyTask(), _opts(run, resume="auto"))
    with pytest.raises(UnsafeCheckpointError):
        load_latest_checkpoint(run)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(run / "ckpt_0000004.pt")
    assert not target.exists()


def test_malicious_checkpoint_through_the_commands(tmp_path, capsys):
    from tag2mask.cli.main import main

    target = tmp_path / "pwned"
    run = tmp_path / "run"
    _plant_malicious_checkpoint(run, target)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(images / "a.png")
    rc = main(["segment", str(images), "--checkpoint", str(run), "--out", str(tmp_path / "seg"), "--device", "cpu",
               "--quiet"])
    assert rc == 2 and "never unpickles" in capsys.readouterr().err
    rc = main(["train", "weclip", "--data", "synth", "--out", str(run), "--resume", "--device", "cpu", "--quiet"])
    assert rc == 2 and "never unpickles" in capsys.readouterr().err
    rc = main(["convert", "checkpoint", str(run / "ckpt_0000004.pt"), "--out", str(tmp_path / "conv")])
    assert rc == 2
    assert not target.exists()


def test_full_disk_stops_with_one_line_naming_the_file(tmp_path, monkeypatch):
    import tag2mask.jobs.checkpoint as ck

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "atomic_write_bytes", no_space)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError) as info:
        train(ToyTask(), _opts(run, resume_command="tag2mask train toy --resume"))
    msg = str(info.value)
    assert "ckpt_0000004.pt" in msg and "tag2mask train toy --resume" in msg and "\n" not in msg
    assert [r["iteration"] for r in read_log(run / "train_log.csv")] == [1, 2, 3, 4]  # the log is intact


def test_full_disk_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys, tiny_clip_path):
    import tag2mask.jobs.checkpoint as ck
    from tag2mask.cli.main import main

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "atomic_write_bytes", no_space)
    monkeypatch.setattr(sys, "argv", ["tag2mask", "train", "weclip", "--data", "synth"])
    run = tmp_path / "run"
    rc = main(["train", "weclip", "--data", "synth", "--weights", str(tiny_clip_path), "--out", str(run), "--iters",
               "1", "--batch-size", "1", "--crop", "32", "--val-split", "none", "--device", "cpu", "--no-compat",
               "--quiet", "--synth-n", "2", "--synth-size", "32"])
    lines = capsys.readouterr().err.strip().splitlines()
    # --iters 1 is inside the warm-up: that warning may come first; the error itself is one line
    err = "\n".join(ln for ln in lines if not ln.startswith("warning: --iters"))
    assert rc == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "disk full while writing" in err and "ckpt_0000001.pt" in err and "--resume" in err


def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        train(ToyTask(iters=2), _opts(run, ckpt_every=1))
    finally:
        os.umask(old)
    for name in ("ckpt_0000001.pt", "config.json", "train_log.csv", "train_log.jsonl", RECORD):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name


def test_non_finite_loss_stops_the_run(tmp_path):
    with pytest.raises(TrainingDiverged, match="iteration 3"):
        train(ToyTask(nan_at=2), _opts(tmp_path / "run"))


def test_checkpoints_hold_only_tensors_and_plain_data(tmp_path):
    run = tmp_path / "run"
    train(ToyTask(iters=2), _opts(run, ckpt_every=1))
    path = latest_checkpoint(run)[0]

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                assert isinstance(k, (str, int)), k
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        else:
            assert obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool)), type(obj)

    walk(torch.load(path, weights_only=True))
    # and nothing but the standard tensor-rebuilding globals appears in the pickle
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    assert len(list(run.glob("*.pt"))) == 2  # one file per save


def test_two_process_torchrun_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--dropout", "0", "--iters", "6", "--batch", "4", "--ckpt-every", "3"]
    # the same options as _toy_tasks.main, in this process
    train(ToyTask(iters=6, batch=4, dropout=0.0), _opts(one, ckpt_every=3))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(REPO / "tests" / "_toy_tasks.py"), str(two), *args],
                         capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = read_run_checkpoint(two, task="toy")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    wa, wb = _weights(one), _weights(two)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    la, lb = _losses(one), _losses(two)
    assert la.keys() == lb.keys()
    for it in la:
        assert la[it] == pytest.approx(lb[it], rel=1e-5, abs=1e-7)


class _PlainToy(ToyTask):
    """The toy regression without its running feature mean (which would advance once per micro-batch)."""

    def step(self, batch, iteration: int):
        x, y = batch
        pred = self.wrapped(x).squeeze(1)
        return {"loss": ((pred - y) ** 2).mean(), "rows": x.shape[0]}


class _AccumulatedToy(_PlainToy):
    accumulation_steps = 2

    def batches(self, start: int, end: int):
        for x, y in super().batches(start, end):
            yield [(x[:1], y[:1]), (x[1:], y[1:])]  # one sample each: the mean of the two losses = the batch loss


def test_gradient_accumulation_steps_once_per_iteration(tmp_path):
    train(_PlainToy(iters=5, batch=2, dropout=0.0, switch_at=None), _opts(tmp_path / "one", ckpt_every=5))
    train(_AccumulatedToy(iters=5, batch=2, dropout=0.0, switch_at=None), _opts(tmp_path / "acc", ckpt_every=5))
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "acc")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "acc")
    assert la.keys() == lb.keys() == set(range(1, 6))  # one optimiser step and one row per iteration
    assert all(la[i] == pytest.approx(lb[i], rel=1e-6) for i in la)
    assert {r["rows"] for r in read_log(tmp_path / "acc" / "train_log.csv")} == {1}  # non-tensor values: the last


def test_gradient_accumulation_needs_the_announced_number_of_micro_batches(tmp_path):
    class Wrong(_AccumulatedToy):
        accumulation_steps = 3

    with pytest.raises(ValueError, match="accumulation_steps is 3 but a batch has 2"):
        train(Wrong(iters=2, batch=2, dropout=0.0, switch_at=None), _opts(tmp_path / "w"))
