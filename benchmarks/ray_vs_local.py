"""Benchmark ``tag2mask label``: the local engine vs ``--engine ray`` on the same images.

Usage::

    python benchmarks/ray_vs_local.py                  # 60 images, Ray with 2 actors
    python benchmarks/ray_vs_local.py --images 200 --workers 2 4

Tiny test CLIP on CPU, ``--refine none``, random 96x96 PNGs. Each run is a fresh ``tag2mask label``
process; Ray runs start their own local cluster (``ray.init``), so their wall time includes Ray's
start-up, reported apart (``ray_start_seconds`` from run.json, i.e. ``ray.init``), and the time until the
first image was recorded (start-up, model loading in the driver and in the actors). Throughput is images /
wall time; "steady" is the rate between the first and the last finished image (manifest ``time`` fields). The local engine runs serially (``--workers 0``) with
threads = the usable CPUs, the Ray actors with CPUs / actors threads each. Needs the ``ray`` extra.
Prints a markdown table with the machine, its load (``uptime``) and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "tests" / "data" / "tiny_clip" / "tiny_clip_vit16_openai.pt"


def make_images(folder: Path, n: int, size: int) -> Path:
    """``n`` random ``size x size`` PNGs and a labels.json; returns its path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    labels = {}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:05d}.png")
        labels[f"img{i:05d}.png"] = ["cat", "dog"] if i % 2 else ["person"]
    path = folder.parent / "labels.json"
    path.write_text(json.dumps(labels))
    return path


def _run(images: Path, labels: Path, out: Path, extra: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "tag2mask", "label", str(images), "--labels", str(labels), "--classes", "voc",
           "--weights", str(WEIGHTS), "--out", str(out), "--refine", "none", "--device", "cpu", "--quiet", *extra]
    t0 = time.time()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    wall = time.time() - t0
    times = sorted(json.loads(line)["time"] for line in (out / "manifest.jsonl").read_text().splitlines())
    # steady rate: between the first and the last finished item (start-up and model loading excluded)
    steady = (len(times) - 1) / max(1e-9, times[-1] - times[0])
    return {"wall": wall, "run": json.loads((out / "run.json").read_text()), "first": times[0] - t0, "steady": steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    a = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        labels = make_images(images, a.images, 96)
        env = dict(os.environ, TAG2MASK_CACHE=str(tmp / "cache"), PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0",
                   OMP_NUM_THREADS=str(cpus))
        rows = [("local, --workers 0", _run(images, labels, tmp / "local", ["--workers", "0"], env), None)]
        for w in a.workers:
            r = _run(images, labels, tmp / f"ray{w}", ["--engine", "ray", "--workers", str(w)], env)
            rows.append((f"ray, {w} actors x {r['run']['engine']['ray_threads_per_worker']} threads", r,
                         r["run"]["engine"]["ray_start_seconds"]))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{a.images} images 96x96, tiny CLIP, --refine none, {cpus} CPUs, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load: {load}\n")
    print("| engine | wall s | img/s (wall) | ray.init s | first image done after s | steady img/s |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, r, start in rows:
        print(f"| {name} | {r['wall']:.1f} | {a.images / r['wall']:.2f} | {'-' if start is None else f'{start:.1f}'} "
              f"| {r['first']:.1f} | {r['steady']:.2f} |")


if __name__ == "__main__":
    main()
