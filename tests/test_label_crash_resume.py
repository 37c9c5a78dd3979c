"""``kill -9`` a labelling run at random points, several times, then ``--resume`` it to the end.

Afterwards every output must be complete and valid (PNG decodes, npz loads, bytes equal to an
uninterrupted run), the manifest must list every item exactly once as ``ok``, and no temporary
or per-rank manifest file may be left behind. Outputs damaged between runs must be redone.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

N_IMAGES = 30
ROOT = Path(__file__).resolve().parents[1]


def _make_corpus(folder: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(1)
    labels = {}
    for i in range(N_IMAGES):
        h, w = int(rng.integers(48, 97)), int(rng.integers(48, 97))
        name = f"img{i:02d}.png" if i % 5 else f"sub/img{i:02d}.png"  # some nested names too
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
        labels[name] = ["cat", "dog"] if i % 2 else ["person"]
    return labels


def _cmd(images: Path, labels: Path, out: Path, weights: Path) -> list[str]:
    return [sys.executable, "-m", "tag2mask", "label", str(images), "--labels", str(labels), "--classes", "voc",
            "--weights", str(weights), "--out", str(out), "--refine", "pamr", "--device", "cpu", "--quiet", "--resume"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TAG2MASK_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    return env


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_after(cmd, env, out: Path, *, after_items: int | None, after_seconds: float, rng: random.Random) -> int:
    """Start the job and SIGKILL it ``after_seconds`` after it has appended ``after_items`` records."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    rank_file = out / "manifest.rank0.jsonl"
    while after_items is not None and _lines(rank_file) < after_items and proc.poll() is None and time.time() < deadline:
        time.sleep(0.003)
    time.sleep(after_seconds)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, tiny_clip_path):
    from tag2mask.io.manifest import verify_outputs
    from tag2mask.io.palette import read_label_png

    images = tmp_path / "images"
    images.mkdir()
    labels = _make_corpus(images)
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    env = _env(tmp_path)
    ref, out = tmp_path / "reference", tmp_path / "crashed"
    # the uninterrupted reference run
    done = subprocess.run(_cmd(images, tmp_path / "labels.json", ref, tiny_clip_path), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    rng = random.Random(1234)
    cmd = _cmd(images, tmp_path / "labels.json", out, tiny_clip_path)
    kills = 0
    # 1) during start-up (imports, model loading, compaction); 2..5) while items are being written
    plans = [(None, rng.uniform(0.05, 1.5))] + [(rng.randint(1, 6), rng.uniform(0.0, 0.06)) for _ in range(4)]
    for after_items, after_seconds in plans:
        rc = _kill_after(cmd, env, out, after_items=after_items, after_seconds=after_seconds, rng=rng)
        kills += rc == -signal.SIGKILL
        # damage finished outputs between runs, as a disk problem would: resume must notice and redo them
        if after_items is not None and (out / "masks").is_dir():
            pngs = sorted((out / "masks").rglob("*.png"))
            if pngs:
                pngs[0].unlink()
            npzs = sorted((out / "cams").rglob("*.npz"))
            if len(npzs) > 1:
                npzs[-1].write_bytes(npzs[-1].read_bytes()[:20])
    assert kills >= 3, "the runs finished before they could be killed; the test did not test anything"

    final = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr

    records = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    items = [r["item"] for r in records]
    expected = sorted(name.rsplit(".", 1)[0] for name in labels)
    assert items == expected  # each item exactly once, sorted
    assert all(r["status"] == "ok" for r in records)
    assert not list(out.glob("manifest.rank*.jsonl"))
    leftovers = [p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers, leftovers
    for rec in records:
        assert verify_outputs(out, rec) is None
        mask_rel, cam_rel = rec["outputs"]
        mask = read_label_png(out / mask_rel)
        assert list(mask.shape) == rec["size"]
        assert np.array_equal(mask, read_label_png(ref / mask_rel))
        with np.load(out / cam_rel) as z, np.load(ref / cam_rel) as r:
            assert z["cams"].dtype == np.float16 and z["cams"].shape[1:] == mask.shape
            assert np.array_equal(z["cams"], r["cams"]) and np.array_equal(z["keys"], r["keys"])
    run = json.loads((out / "run.json").read_text())
    assert run["failed"] == 0 and run["manifest_counts"] == {"ok": N_IMAGES}

    # a further --resume verifies everything and redoes nothing
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    run = json.loads((out / "run.json").read_text())
    assert run["written"] == 0 and run["skipped"] == N_IMAGES


# ---- the runner and the checkpoint helpers on their own (no model) ------------------------------------


def test_runner_generic_process_fn_resume_and_errors(tmp_path):
    """The runner as another command would use it: plain items, ``process_fn -> [paths]``."""
    from tag2mask.io.atomic import atomic_write_text
    from tag2mask.jobs import ItemError, JobOptions, run_items

    out = tmp_path / "run"
    calls: list[str] = []

    def process(item: str):
        calls.append(item)
        if item == "bad":
            raise ItemError("labels", f"{item}: refused on purpose")
        if item == "boom":
            raise RuntimeError("unexpected")
        path = out / "txt" / f"{item}.txt"
        atomic_write_text(path, item * 3)
        return [path]

    items = ["a", "b", "bad", "c/d", "boom", "a"]
    options = JobOptions(quiet=True)
    summary = run_items(items, process, out, {"v": 1}, options, key_fn=str)
    assert (summary.written, summary.failed, summary.exit_code) == (3, 3, 1)
    recs = {json.loads(l)["item"]: json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()}
    assert recs["bad"]["error_kind"] == "labels" and recs["bad"]["error"] == "bad: refused on purpose"
    assert recs["boom"]["error_kind"] == "internal" and "RuntimeError: unexpected" in recs["boom"]["error"]
    assert recs["a [duplicate #5]"]["error_kind"] == "duplicate"
    assert recs["c/d"]["outputs"] == ["txt/c/d.txt"]

    calls.clear()
    (out / "txt" / "b.txt").write_text("bbX")  # same size, other content: the SHA-256 check redoes it
    summary = run_items(items, process, out, {"v": 1}, JobOptions(quiet=True, resume=True), key_fn=str)
    assert sorted(calls) == ["b", "bad", "boom"]  # ok items skipped, failed ones retried
    assert summary.skipped == 2 and summary.written == 1
    assert (out / "txt" / "b.txt").read_text() == "bbb"
    with pytest.raises(ValueError, match="different settings"):
        run_items(items, process, out, {"v": 2}, JobOptions(quiet=True), key_fn=str)


def test_checkpoints_resume_from_newest_valid(tmp_path):
    import torch

    from tag2mask.jobs.checkpoint import latest_checkpoint, load_latest_checkpoint, save_checkpoint

    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step))}, keep_last=2)
    assert not (tmp_path / "step-00000010.pt").exists()  # pruned after newer ones were safe
    path, step = latest_checkpoint(tmp_path)
    assert step == 30 and path.name == "step-00000030.pt"
    path.write_bytes(path.read_bytes()[:50])  # a damaged newest checkpoint is skipped
    state, step = load_latest_checkpoint(tmp_path)
    assert step == 20 and torch.equal(state["w"], torch.full((3,), 20.0))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
