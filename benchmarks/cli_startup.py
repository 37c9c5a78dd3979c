"""Wall time of ``tag2mask --help`` and of every sub-command's ``--help``: this tree against a git
revision (default: the commit before the lazy imports), side by side in one run.

The old revision's ``tag2mask`` package is exported with ``git archive`` into a temporary folder; each
case runs ``python -m tag2mask ... --help`` in a fresh interpreter, alternating old and new, and the
table shows the median of ``--repeats`` runs. Start-up time is sensitive to load: the header prints
the load average before and after.

    python benchmarks/cli_startup.py --before 4414c38
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [(), ("label",), ("segment",), ("eval",), ("demo",), ("info",), ("serve",), ("synth",), ("train",),
         ("train", "weclip"), ("prompts",)]


def _time(pythonpath: Path, argv: tuple[str, ...]) -> float:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tag2mask", *argv, "--help"], env=env, cwd=pythonpath,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="4414c38", help="git revision to compare with")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp)
        archive = subprocess.run(["git", "archive", "--format=tar", args.before, "tag2mask"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(old, filter="data")
        cases = [c for c in CASES if c != ("prompts",) or (old / "tag2mask" / "cli" / "prompts_cmd.py").exists()]
        times = {c: {"before": [], "after": []} for c in cases}
        for _ in range(args.repeats):
            for case in cases:
                times[case]["before"].append(_time(old, case))
                times[case]["after"].append(_time(ROOT, case))
    load1 = os.getloadavg()
    print(f"tag2mask --help wall time (s), median of {args.repeats}, before = {args.before}, after = working tree; "
          f"{os.cpu_count()} CPUs, load average {load0[0]:.1f} -> {load1[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    print("| command | before (s) | after (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for case in cases:
        before, after = (statistics.median(times[case][k]) for k in ("before", "after"))
        name = " ".join(("tag2mask", *case, "--help"))
        print(f"| `{name}` | {before:.2f} | {after:.2f} | {before / after:.1f}x |")


if __name__ == "__main__":
    main()
