"""Benchmark ``tag2mask label`` scaling: images/s with 1 vs N processes, peak RSS vs data-set size.

Usage::

    python benchmarks/label_scaling.py                       # speed: 200 images, 1 and 2 processes;
                                                             # memory: 1,000 and 10,000 images
    python benchmarks/label_scaling.py --speed-images 100 --procs 1 2 --sizes 1000 --size 64

Everything uses the tiny test CLIP on CPU (``--refine none``, one OpenMP thread per process), on
random synthetic images, so the numbers measure the job machinery and the model's per-image cost,
not segmentation quality. Each run is a fresh subprocess (``torchrun --standalone`` for N > 1);
peak RSS is the largest ``ru_maxrss`` of any process of that run (``RUSAGE_CHILDREN``), so it is
per-process memory, which must stay flat as the number of images grows. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "tests" / "data" / "tiny_clip" / "tiny_clip_vit16_openai.pt"


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random ``size x size`` PNGs (in sub-folders of 1,000) and a labels.json; returns its path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n):
        name = f"{i // 1000:03d}/img{i:06d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name, compress_level=1)
        labels[name] = ["cat", "dog"] if i % 2 else ["person"]
    path = folder.parent / f"labels_{n}.json"
    path.write_text(json.dumps(labels))
    return path


def run_label(images: Path, labels: Path, out: Path, procs: int, cache: Path) -> dict:
    """One labelling run in a fresh process tree; returns wall time, run.json and peak RSS (MiB)."""
    args = ["-m", "tag2mask", "label", str(images), "--labels", str(labels), "--classes", "voc",
            "--weights", str(WEIGHTS), "--out", str(out), "--refine", "none", "--device", "cpu", "--quiet"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TAG2MASK_CACHE=str(cache), PYTHONPATH=str(ROOT),
               TAG2MASK_DIST_BACKEND="gloo")
    # measure in a wrapper process so RUSAGE_CHILDREN covers only this run's process tree
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.time(); rc = subprocess.call(sys.argv[1:]); wall = time.time() - t\n"
        "print(json.dumps({'rc': rc, 'wall': wall, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark run failed:\n{res.stderr[-3000:]}")
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    if stats["rc"] != 0:
        raise RuntimeError(f"tag2mask label exited with {stats['rc']}:\n{res.stderr[-3000:]}")
    record = json.loads((out / "run.json").read_text())
    return {"wall": stats["wall"], "rss_mib": stats["maxrss_kb"] / 1024, "run": record}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed-images", type=int, default=200, help="images for the 1-vs-N-process speed runs")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="data-set sizes for the memory runs")
    ap.add_argument("--size", type=int, default=48, help="image side in pixels (default 48)")
    ap.add_argument("--workdir", default=None, help="keep the synthetic data and outputs here (default: a temp dir)")
    args = ap.parse_args(argv)

    base = Path(args.workdir or tempfile.mkdtemp(prefix="t2m_label_bench_"))
    cache = base / "cache"
    rows = []
    speed_dir = base / f"speed_{args.speed_images}" / "images"
    labels = make_images(speed_dir, args.speed_images, args.size) if not speed_dir.exists() else speed_dir.parent / f"labels_{args.speed_images}.json"
    run_label(speed_dir, labels, base / "warmup", 1, cache)  # fills the text-embedding cache, warms the disk cache
    for p in args.procs:
        r = run_label(speed_dir, labels, base / f"speed_out_p{p}", p, cache)
        rec = r["run"]
        rows.append(("speed", args.speed_images, p, rec["images_per_second"], args.speed_images / r["wall"], r["rss_mib"], r["wall"]))
    for n in args.sizes:
        folder = base / f"mem_{n}" / "images"
        t0 = time.time()
        labels = make_images(folder, n, args.size) if not folder.exists() else folder.parent / f"labels_{n}.json"
        print(f"[{n} images generated in {time.time() - t0:.0f}s]", file=sys.stderr)
        r = run_label(folder, labels, base / f"mem_out_{n}", 1, cache)
        rows.append(("memory", n, 1, r["run"]["images_per_second"], n / r["wall"], r["rss_mib"], r["wall"]))

    print(f"\n`tag2mask label`, tiny CLIP, CPU ({os.cpu_count()} cores), {args.size}x{args.size} images, --refine none, "
          "OMP_NUM_THREADS=1 per process\n")
    print("| run | images | processes | images/s (labelling loop) | images/s (wall, incl. start-up) | peak RSS per process (MiB) | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, n, p, ips, wall_ips, rss, wall in rows:
        print(f"| {kind} | {n:,} | {p} | {ips:.1f} | {wall_ips:.1f} | {rss:.0f} | {wall:.1f} |")
    print(f"\n(data and outputs in {base})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
