"""onnxruntime against torch on the CPU: time per forward of exported segmentation networks.

Each network is built with random weights (same compute as trained ones), wrapped as ``tag2mask export``
wraps a run (``TtaLogits``: scale 1, no flip, logits bilinear to the input size), exported with
:func:`tag2mask.export.onnx_graph.export_onnx` (which checks onnxruntime against torch first) and timed on
one fixed ``(1, 3, S, S)`` input: the median of ``--n`` forwards after one warm-up, the two engines
alternating (a shared machine's load changes hit both alike), each with the same number of threads
(``--threads``, default 1). The load average is printed with the table.

    python benchmarks/onnx_speed.py                       # deeplab-v2 (ResNet-101) and segformer-b0 at 512
    python benchmarks/onnx_speed.py --models deeplab-v2-tiny --size 256 --n 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

NETWORKS = {  # name -> (tag2mask.models name, options)
    "deeplab-v2": ("deeplab-v2", {"variant": "resnet101"}),
    "deeplab-v2-tiny": ("deeplab-v2", {"variant": "tiny"}),
    "deeplab-v3plus": ("deeplab-v3plus", {"variant": "resnet101"}),
    "segformer-b0": ("segformer", {"variant": "b0"}),
    "mask2former-swin-tiny": ("mask2former", {"backbone": "swin-tiny"}),  # fixed size only (docs/export.md)
}


def _median_seconds(fns, n: int) -> list[float]:
    """Median seconds of each function over ``n`` rounds after one warm-up; the functions alternate within a
    round, so a change of the machine's load hits them alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, acc in zip(fns, times):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return [statistics.median(acc) for acc in times]


def measure(name: str, size: int, n: int, threads: int, folder: Path) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from tag2mask.export.onnx_graph import ExportSpec, TtaLogits, export_onnx
    from tag2mask.models import build_segmenter

    torch.manual_seed(0)
    network, options = NETWORKS[name]
    model = build_segmenter(network, 21, **options).eval()
    spec = ExportSpec(module=TtaLogits(model), kind="segmenter", class_names=tuple(f"c{i}" for i in range(21)),
                      has_background=True, mean=(0.5,) * 3, std=(0.25,) * 3, size=(size, size),
                      source={"network": name})
    t = time.perf_counter()
    meta = export_onnx(spec, folder / f"{name}.onnx")
    export_s = time.perf_counter() - t
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    options_ = ort.SessionOptions()
    options_.intra_op_num_threads = options_.inter_op_num_threads = threads
    session = ort.InferenceSession(str(folder / f"{name}.onnx"), options_, providers=["CPUExecutionProvider"])
    xt = torch.from_numpy(x)
    with torch.no_grad():
        torch_s, ort_s = _median_seconds([lambda: spec.module(xt), lambda: session.run(["logits"], {"image": x})], n)
    diff = max(meta["check"]["max_abs_logit_diff_onnxruntime_vs_torch"].values())
    with torch.no_grad():
        scale = float(spec.module(torch.from_numpy(
            np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32))).abs().max())
    # random weights: a deep network's logits can be large, so the difference is also given relative to them
    return {"network": name, "size": size, "torch_s": torch_s, "ort_s": ort_s, "export_s": export_s, "diff": diff,
            "rel": diff / max(scale, 1e-12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deeplab-v2", "segformer-b0"], choices=sorted(NETWORKS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), load average before {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| network | input | torch s/forward | onnxruntime s/forward | ort / torch | export s | max abs logit diff "
          "(relative to max abs logit) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = measure(name, args.size, args.n, args.threads, Path(tmp))
            print(f"| {name} | {r['size']}x{r['size']} | {r['torch_s']:.3f} | {r['ort_s']:.3f} | "
                  f"{r['ort_s'] / r['torch_s']:.2f}x | {r['export_s']:.1f} | {r['diff']:.1e} ({r['rel']:.1e}) |", flush=True)
    print(f"# load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
