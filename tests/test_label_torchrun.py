"""``torchrun --nproc-per-node 2 -m tag2mask label`` (gloo, CPU) == the same job in one process.

Masks, CAMs, the COCO JSON and the merged manifest (apart from timing and rank fields) must be
identical; the failure of one bad item must be counted once, in the merged summary of both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time", "seconds", "rank")


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TAG2MASK_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["TAG2MASK_DIST_BACKEND"] = "gloo"
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _manifest(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path, tiny_clip_path):
    pytest.importorskip("torch.distributed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    rng = np.random.default_rng(3)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    labels = {}
    for i in range(6):
        name = f"sub/im{i}.png" if i == 4 else f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / name)
        labels[name] = ["cat", "dog"] if i % 2 else ["person"]
    (images / "broken.png").write_bytes(b"")  # one failure, to check the merged count
    labels["broken.png"] = ["cat"]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    args = ["-m", "tag2mask", "label", str(images), "--labels", str(tmp_path / "labels.json"), "--classes", "voc",
            "--weights", str(tiny_clip_path), "--refine", "pamr", "--device", "cpu", "--coco-json", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = _run([sys.executable, *args, "--out", str(one)], tmp_path)
    assert single.returncode == 1, single.stderr
    multi = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  *args, "--out", str(two)], tmp_path)
    assert multi.returncode == 1  # torchrun passes on rank 0's "some items failed" exit code
    assert "exitcode  : -15" not in multi.stderr  # no rank was torn down by torchrun
    assert "6 written, 0 already done, 1 failed of 7 items" in multi.stderr, multi.stderr[-3000:]

    assert _manifest(one) == _manifest(two)
    assert sorted((two / "logs").glob("rank*.log")) == [two / "logs" / "rank0.log", two / "logs" / "rank1.log"]
    assert not list(two.glob("manifest.rank*.jsonl"))
    ranks = {json.loads(l)["rank"] for l in (two / "manifest.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}  # both ranks really did work
    for rec in _manifest(one):
        for rel in rec["outputs"]:
            assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    assert (one / "annotations.json").read_bytes() == (two / "annotations.json").read_bytes()
    run1, run2 = (json.loads((d / "run.json").read_text()) for d in (one, two))
    for key in ("items", "written", "failed", "manifest_counts"):
        assert run1[key] == run2[key], key
    assert run2["world_size"] == 2 and len(run2["per_rank"]) == 2
