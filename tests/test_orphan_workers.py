"""Worker processes of an overlapped job end when the job's process dies (kill -9): no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # fields after the name: state, ppid, pgrp, session, ...
        if int(stat[3]) == sid and stat[0] != b"Z":
            out.append(int(entry.name))
    return out


def test_kill_9_of_the_job_ends_its_workers(tmp_path, tiny_clip_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(400):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        labels[f"{i:03d}.png"] = ["cat"]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, "-m", "tag2mask", "label", str(images), "--labels",
                            str(tmp_path / "labels.json"), "--classes", "voc", "--weights", str(tiny_clip_path),
                            "--refine", "none", "--device", "cpu", "--workers", "1", "--quiet", "--out", str(out)],
                           cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None:
            done = any(p.stat().st_size > 0 for p in out.glob("manifest*.jsonl")) if out.is_dir() else False
            if done and len(_session_members(job.pid)) >= 3:  # the job, the fork server, a worker
                break
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before it could be killed"
        helpers = [p for p in _session_members(job.pid) if p != job.pid]
        assert helpers, "no worker processes were found"
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        deadline = time.time() + 20
        while time.time() < deadline and _session_members(job.pid):
            time.sleep(0.2)
        left = _session_members(job.pid)
        assert not left, f"still running after the job was killed: {left}"
    finally:
        for pid in _session_members(job.pid):  # never leave our own test's processes behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
