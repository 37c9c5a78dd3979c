"""``tag2mask bench`` on the synthetic world: every open-vocabulary method on all 8 benchmark layouts.

    python benchmarks/bench_synthetic.py --n 8 --out /tmp/bench_synth

Writes a tiny copy of each of the 8 mmseg layouts filled with synthetic-world scenes
(:func:`tag2mask.bench.synthetic.write_synthetic_layout`, ``n`` images each, seeds 0..n-1), runs
``tag2mask bench`` on them with the shipped tiny CLIP, ``--preset published`` and the synthetic name sets
(``--names-DATASET``), prints the papers' table and the end-to-end speed, then runs the same command
again with ``--resume`` and prints how long re-verifying the finished run takes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from tag2mask.bench.datasets import BENCHMARK_NAMES
from tag2mask.bench.synthetic import write_synthetic_layout
from tag2mask.cli.main import main


def _command(data: Path, names: dict[str, Path], out: Path, workers: str) -> list[str]:
    argv = ["bench", "--data", str(data), "--methods", "all", "--out", str(out), "--device", "cpu", "--quiet",
            "--resume", "--workers", workers]
    for name, path in names.items():
        argv += [f"--names-{name}", str(path)]
    return argv


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = out / "data"
    names = {b: write_synthetic_layout(data, b, n=args.n, size=args.size) for b in BENCHMARK_NAMES}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rc = main(_command(data, names, out / "bench", args.workers))
    first = time.perf_counter() - t0
    speed = json.loads((out / "bench" / "results.json").read_text())["speed"]
    print((out / "bench" / "results.md").read_text())
    t0 = time.perf_counter()
    rc2 = main(_command(data, names, out / "bench", args.workers))
    again = time.perf_counter() - t0
    print(f"exit codes {rc} / {rc2}; {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, load average {load:.1f} at start")
    print(f"first run: {speed['images_written']} images in {first:.1f} s wall "
          f"({speed['images_per_second']} images/s end to end inside the cells)")
    print(f"second run with --resume (every cell finished): {again:.1f} s, images written "
          f"{json.loads((out / 'bench' / 'results.json').read_text())['speed']['images_written']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="images per benchmark")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--workers", default="0", help="--workers of tag2mask bench (default 0)")
    parser.add_argument("--out", default="bench_synthetic")
    run(parser.parse_args())
