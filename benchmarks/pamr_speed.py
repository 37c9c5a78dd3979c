"""PAMR before/after: the vectorised ``tag2mask.refinement.pamr.PAMR`` against the implementation it
replaced (``tests/pamr_reference.py``, kept verbatim), side by side in one process.

Inputs are the generated scenes of ``tests/test_pamr.py`` (flat 8-bit regions, a noisy half, CAM-like
scores). For every case the two implementations run alternately ``--repeats`` times; the table gives
the median wall time of each, the speed-up and the largest absolute difference of the outputs.

    OMP_NUM_THREADS=1 python benchmarks/pamr_speed.py            # one core
    python benchmarks/pamr_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pamr_reference import ReferencePAMR  # noqa: E402
from test_pamr import _scene  # noqa: E402

from tag2mask.refinement.pamr import PAMR  # noqa: E402

CASES = [((224, 224), 4), ((375, 500), 4), ((375, 500), 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"PAMR (10 steps, dilations 1,2,4,8,12,24), float32, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), load average {load:.1f}, {time.strftime('%Y-%m-%d')}")
    print("| image | classes | reference (ms) | vectorised (ms) | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for (H, W), classes in CASES:
        image, scores = _scene(H, W, seed=0)
        scores = torch.cat([scores] * (classes // scores.shape[1]), dim=1)
        times: dict[str, list[float]] = {"reference": [], "vectorised": []}
        outs = {}
        with torch.no_grad():
            for _ in range(args.repeats):
                for name, impl in (("reference", ReferencePAMR()), ("vectorised", PAMR())):
                    t0 = time.perf_counter()
                    outs[name] = impl(image, scores)
                    times[name].append(time.perf_counter() - t0)
        ref, new = (statistics.median(times[k]) * 1000 for k in ("reference", "vectorised"))
        diff = float((outs["reference"] - outs["vectorised"]).abs().max())
        print(f"| {W}x{H} | {classes} | {ref:.0f} | {new:.0f} | {ref / new:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
