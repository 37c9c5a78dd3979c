"""Throughput of the whole ``tag2mask label --refine crf``: serial (``--workers 0``, today's order: decode,
CLIP-ES, CRF, write, one image after the other) against overlapped (``--workers N``), side by side.

Data: ``--n`` VOC-sized (500x375) synthetic scenes rendered by ``tag2mask.synth`` (JPEG, quality 90),
each labelled with the VOC names standing in for its objects' classes. Model: a ViT-B/16-sized CLIP
with random weights (same compute as the real one; attention sharpened as in
``benchmarks/clip_es_throughput.py``), saved once and loaded by every run with ``--classes voc``
(official numerics). Each mode runs as its own ``python -m tag2mask label`` process with a fresh text
cache; with ``--rounds 2`` the order alternates to spread the drift of a shared machine's load. The
table gives images/s over the whole command (start-up included) and over the labelling loop
(``run.json``'s ``seconds``), the peak memory of the whole process tree (sum of PSS, which counts
pages shared by the forked workers once) and of the main process (RSS), and whether every mask and
CAM file and every manifest record equals the serial run's.

    python benchmarks/label_pipeline.py --n 200                      # CPU, workers = CPUs - 1 (at least 1)
    python benchmarks/label_pipeline.py --n 200 --device cuda --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

VOLATILE = ("time", "seconds", "rank", "source")


def make_data(folder: Path, n: int) -> tuple[Path, Path]:
    """``n`` 500x375 synthetic JPEGs and a labels.json with VOC names; returns (image folder, labels file)."""
    from tag2mask.synth.scenes import generate_scene
    from tag2mask.vocab.classes import VOC_CLASSES

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in range(n):
        scene = generate_scene(1000 + i, size=500, min_objects=1, max_objects=3)
        crop, mask = scene.image[:375], scene.mask[:375]
        present = [int(c) for c in np.unique(mask) if 0 < c < 255] or [int(scene.labels[0])]
        name = f"scene_{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).save(images / name, quality=90)
        labels[name] = [VOC_CLASSES[(c - 1) % len(VOC_CLASSES)] for c in present]
    (folder / "labels.json").write_text(json.dumps(labels))
    return images, folder / "labels.json"


def make_weights(path: Path) -> Path:
    from clip_es_throughput import build_model

    from tag2mask.clip.loading import save_clip

    save_clip(build_model("cpu"), path)
    return path


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _memory_kib(pid: int, field: str) -> int:
    source = "smaps_rollup" if field == "Pss" else "status"
    key = "Pss:" if field == "Pss" else "VmRSS:"
    try:
        with open(f"/proc/{pid}/{source}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak PSS of a process tree and peak RSS of its root, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_tree_kib = self.peak_main_kib = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tree, todo = [], [self.pid]
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo.extend(_children(pid))
            self.peak_tree_kib = max(self.peak_tree_kib, sum(_memory_kib(p, "Pss") for p in tree))
            self.peak_main_kib = max(self.peak_main_kib, _memory_kib(self.pid, "VmRSS"))
            self.stop.wait(self.interval)


def run_label(images: Path, labels: Path, weights: Path, out: Path, workers: str, args, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "tag2mask", "label", str(images), "--labels", str(labels), "--classes", "voc",
           "--weights", str(weights), "--refine", args.refine, "--device", args.device, "--workers", workers,
           "--out", str(out), "--quiet"]
    if args.batch_size and workers != "0":
        cmd += ["--batch-size", str(args.batch_size)]
    env = dict(os.environ, TAG2MASK_CACHE=str(cache), PYTHONPATH=str(ROOT))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"label --workers {workers} failed ({proc.returncode}):\n{err[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    return {"workers": run.get("workers", 0), "batch_size": run.get("batch_size", 1), "written": run["written"],
            "wall": wall, "loop": run["seconds"], "peak_tree_mib": sampler.peak_tree_kib / 1024,
            "peak_main_mib": sampler.peak_main_kib / 1024, "load_before": load, "load_after": os.getloadavg()[0]}


def same_outputs(a: Path, b: Path) -> bool:
    def records(out: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE}
                for l in (out / "manifest.jsonl").read_text().splitlines()]

    if records(a) != records(b):
        return False
    return all((a / rel).read_bytes() == (b / rel).read_bytes() for rec in records(a) for rel in rec["outputs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="images (default 200)")
    ap.add_argument("--workers", default=None,
                    help="--workers of the overlapped run (default: the usable CPUs minus one, at least 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="--batch-size of the overlapped run (default: label's)")
    ap.add_argument("--refine", default="crf", choices=("crf", "pamr", "none"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternating the order")
    ap.add_argument("--work-dir", default=None, help="keep data and outputs here (default: a temporary folder)")
    args = ap.parse_args()

    if args.workers is None:
        from tag2mask.jobs.overlap import usable_cpus

        args.workers = str(max(1, usable_cpus() - 1))
    tmp = None if args.work_dir else tempfile.TemporaryDirectory()
    work = Path(args.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images, labels = make_data(work / "data", args.n)
    weights = make_weights(work / "vit_b16_random.safetensors")
    print(f"data and weights ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for r in range(args.rounds):
        modes = [("serial", "0"), ("overlapped", args.workers)]
        for name, workers in (modes if r % 2 == 0 else modes[::-1]):
            out = work / f"out_{name}_{r}"
            shutil.rmtree(out, ignore_errors=True)
            res = run_label(images, labels, weights, out, workers, args, work / f"cache_{name}_{r}")
            res.update(mode=name, round=r, out=out)
            rows.append(res)
            print(f"{name} round {r}: {res['wall']:.0f} s", file=sys.stderr)
    serial = {r["round"]: r for r in rows if r["mode"] == "serial"}
    import torch

    print(f"tag2mask label --refine {args.refine}, {args.n} synthetic 500x375 JPEGs, ViT-B/16-sized random CLIP, "
          f"--classes voc, device {args.device}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| run | workers | batch | images | wall (s) | images/s (wall) | images/s (loop) | speed-up (wall) | "
          "peak memory, all processes (PSS MiB) | peak memory, main (RSS MiB) | load avg before/after | outputs = serial |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for row in rows:
        base = serial[row["round"]]
        same = "(reference)" if row is base else ("yes" if same_outputs(base["out"], row["out"]) else "NO")
        print(f"| {row['mode']} ({row['round'] + 1}) | {row['workers']} | {row['batch_size']} | {row['written']} | "
              f"{row['wall']:.1f} | {row['written'] / row['wall']:.3f} | {row['written'] / row['loop']:.3f} | "
              f"{base['wall'] / row['wall']:.2f}x | {row['peak_tree_mib']:.0f} | {row['peak_main_mib']:.0f} | "
              f"{row['load_before']:.1f} / {row['load_after']:.1f} | {same} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
