"""Benchmark ``tag2mask eval`` (label-map mode): time and peak RSS for N synthetic images.

Usage::

    python benchmarks/eval_speed.py              # N = 100 and 1000, 500x375, 21 classes
    python benchmarks/eval_speed.py --sizes 100 1000 5000 --height 375 --width 500

For each N a fresh subprocess evaluates the folder pair, so each peak RSS (``ru_maxrss``) is
that run's own; memory should stay flat in N because images are streamed through one
confusion matrix. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_pairs(folder: Path, n: int, h: int, w: int, num_classes: int, seed: int = 0) -> None:
    """Write ``n`` blocky GT masks (with a 255 border) and noisy predictions as palette PNGs."""
    from tag2mask.io.palette import save_label_png

    rng = np.random.default_rng(seed)
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    (folder / "pred").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        gt = np.zeros((h, w), np.uint8)
        for _ in range(3):  # a few rectangles of random classes
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            gt[y0:y0 + rng.integers(10, h // 2), x0:x0 + rng.integers(10, w // 2)] = rng.integers(1, num_classes)
        pred = np.roll(gt, int(rng.integers(-8, 9)), axis=1)  # shifted copy = realistic partial overlap
        gt[:2, :] = 255
        save_label_png(folder / "gt" / f"{i:06d}.png", gt)
        save_label_png(folder / "pred" / f"{i:06d}.png", pred)


def worker(folder: Path, num_classes: int) -> None:
    """Run the evaluation once and print JSON with seconds and peak RSS (MiB)."""
    from tag2mask.cli.eval_cmd import evaluate_label_folder

    t0 = time.perf_counter()
    res = evaluate_label_folder(folder / "pred", folder / "gt", num_classes)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    print(json.dumps({"seconds": dt, "peak_rss_mib": rss_mib, "miou": res["scores"]["Mean IoU"],
                      "num_images": res["num_images"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--num-classes", type=int, default=21)
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.num_classes)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="t2m_evalbench_") as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"n{n}"
            t0 = time.perf_counter()
            make_pairs(folder, n, args.height, args.width, args.num_classes)
            gen = time.perf_counter() - t0
            out = subprocess.run([sys.executable, __file__, "--worker", str(folder),
                                  "--num-classes", str(args.num_classes)],
                                 check=True, capture_output=True, text=True, env={**os.environ})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((n, r["seconds"], 1000 * r["seconds"] / n, r["peak_rss_mib"], gen))
    print(f"`tag2mask eval` (labels mode), {args.width}x{args.height}, {args.num_classes} classes, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    print("| images | eval time (s) | ms / image | peak RSS (MiB) | data generation (s) |")
    print("|---:|---:|---:|---:|---:|")
    for n, s, ms, rss, gen in rows:
        print(f"| {n} | {s:.2f} | {ms:.2f} | {rss:.0f} | {gen:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
