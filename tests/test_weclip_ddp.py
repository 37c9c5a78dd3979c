"""Two-process ``torchrun`` (gloo, CPU) WeCLIP training smoke test: runs, validates, checkpoints, resumes."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from tag2mask.methods.weclip.train_task import load_training_checkpoint


def _entry() -> list[str]:
    """``-m tag2mask train`` once the command is registered, else the module's own entry point."""
    from tag2mask.cli.main import COMMANDS

    return ["-m", "tag2mask", "train"] if "train" in COMMANDS else ["-m", "tag2mask.cli.train_cmd"]


def _torchrun(out: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *_entry(),
        "weclip", "--data", "synth", "--weights", str(weights), "--out", str(out), "--device", "cpu",
        "--iters", "4", "--batch-size", "2", "--crop", "64", "--synth-n", "4", "--synth-size", "80",
        "--ckpt-every", "2", "--val-every", "2", "--val-limit", "2", "--log-every", "1", "--rfm-start", "2",
        "--quiet", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAG2MASK_CACHE": str(out.parent / "cache")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_two_processes(tmp_path: Path, tiny_clip_path: Path) -> None:
    out = tmp_path / "ddp"
    res = _torchrun(out, tiny_clip_path, "--stop-at", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = load_training_checkpoint(out)
    assert ckpt["iteration"] == 2 and ckpt["world_size"] == 2
    assert len(ckpt["rng"]) == 2  # one RNG state per rank, for exact resume
    assert not any(k.startswith("module.") for k in ckpt["modules"]["decoder"])  # saved unwrapped from DDP

    res = _torchrun(out, tiny_clip_path, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    final = load_training_checkpoint(out)
    assert final["iteration"] == 4
    before, after = ckpt["modules"]["decoder"], final["modules"]["decoder"]
    assert any(not torch.equal(after[k], before[k]) for k in before)
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) for r in rows)  # neither NaN nor inf
    with open(out / "val_log.csv", newline="") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [2, 4]
