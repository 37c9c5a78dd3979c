"""Peak RSS of each loader on a small crafted file (issue #30): how much memory a tiny hostile file costs.

    python benchmarks/loader_peak_rss.py [--cap-gb 3]

Each case runs in a fresh subprocess capped with RLIMIT_AS (a lower bound when the cap is hit); the
child prints its peak RSS (ru_maxrss) minus its RSS right before the call, and how the loader ended.
The crafted files are made by :func:`craft` (also used by tests/test_loader_budgets.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

CASES = ("safetensors_config", "state_dict_layers", "hf_folder", "stride0", "torchscript_data_pkl",
         "cam_npz_seed", "cam_npz_eval", "rle_proposal", "weclip_recipe", "fma_prompt_metadata")


def _tiny_state() -> tuple[dict, dict]:
    from safetensors import safe_open

    path = Path(__import__("tag2mask").__file__).parent / "assets" / "tiny_clip.safetensors"
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {})["tag2mask_config"])


def craft(case: str, d: Path, inflate_mb: int = 2048) -> Path:
    """Write the crafted input of ``case`` under ``d``; returns the path a loader is given.

    ``inflate_mb``: what the zip bombs inflate to (the tests use less, to be quick).
    """
    import torch
    from safetensors.torch import save_file

    sd, cfg = _tiny_state()
    if case == "safetensors_config":  # a tiny file whose stored config asks for a huge model
        big = json.loads(json.dumps(cfg))
        big["vision"].update(width=4096, layers=48, heads=64)
        big["text"].update(width=4096, layers=48, heads=64)
        p = d / "huge_config.safetensors"
        save_file({"logit_scale": torch.zeros(())}, str(p), metadata={"tag2mask_config": json.dumps(big), "format": "pt"})
    elif case == "state_dict_layers":  # a few KB whose tensor shapes infer a ~1.2 G-parameter CLIP
        from tag2mask.clip.model import CLIP, CLIPConfig

        big = json.loads(json.dumps(cfg))
        big["vision"].update(width=2048, layers=24, heads=32)
        big["text"].update(width=2048, layers=24, heads=32)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in CLIP(CLIPConfig.from_dict(big)).state_dict().items()}
        one = torch.zeros(1, dtype=torch.float16)
        p = d / "layers.pt"
        torch.save({k: one.expand(s) if len(s) else one[0] for k, s in shapes.items()}, p)
    elif case == "hf_folder":  # config.json asking for a huge model, next to a tiny weight file
        p = d / "hf"
        p.mkdir()
        (p / "config.json").write_text(json.dumps({
            "model_type": "clip", "projection_dim": 4096,
            "text_config": {"hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64,
                            "intermediate_size": 16384, "max_position_embeddings": 77, "vocab_size": 49408},
            "vision_config": {"hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64,
                              "intermediate_size": 16384, "image_size": 224, "patch_size": 14}}))
        save_file({"logit_scale": torch.zeros(())}, str(p / "model.safetensors"))
    elif case == "stride0":  # one stored element viewed as a 20000x20000 tensor
        p = d / "stride0.pt"
        torch.save({"w": torch.zeros(1, dtype=torch.float16).expand(20000, 20000)}, p)
    elif case == "torchscript_data_pkl":  # a TorchScript-shaped zip whose data.pkl inflates to 2 GB
        p = d / "bomb_ts.pt"
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            z.writestr("archive/constants.pkl", b"\x80\x02).")
            z.writestr("archive/version", b"3\n")
            with z.open("archive/data.pkl", "w", force_zip64=True) as f:
                block = b"\x00" * (1 << 24)
                for _ in range(inflate_mb // 16):
                    f.write(block)
    elif case in ("cam_npz_seed", "cam_npz_eval"):  # a small npz whose arrays inflate to GBs
        p = d / "cams" / "a.npz"
        p.parent.mkdir()
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            z.writestr("keys.npy", _npy(np.array([0], np.int64)))
            with z.open("cams.npy", "w", force_zip64=True) as f:
                side = int((inflate_mb * 2**20 / 2) ** 0.5)
                shape = (1, side, side)
                f.write(_npy_header(np.dtype(np.float16), shape))
                block = b"\x00" * (1 << 24)
                total = 2 * side * side
                while total > 0:
                    f.write(block[: min(total, len(block))])
                    total -= len(block)
    elif case == "rle_proposal":  # 94 bytes: a 50000x50000 RLE, decoded before its size is checked
        p = d / "proposals" / "a.json"
        p.parent.mkdir()
        p.write_text(json.dumps([{"segmentation": {"size": [50000, 50000], "counts": [0, 2500000000]}}]))
    elif case == "weclip_recipe":  # a run recipe asking for a 16384-wide decoder
        from tag2mask.methods.weclip.model import preset

        recipe = preset("synth").to_dict()
        recipe["embed_dim"] = 16384
        p = d / "recipe.json"
        p.write_text(json.dumps(recipe))
    elif case == "fma_prompt_metadata":  # prompt metadata asking for 10^8 context tokens
        p = d / "prompts.json"
        p.write_text(json.dumps({"n_ctx": 10**8}))
    else:
        raise ValueError(case)
    return p


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()  # magic string included


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def run_loader(case: str, path: Path) -> None:
    """Call the loader ``case`` exercises on ``path`` (in the current process)."""
    if case in ("safetensors_config", "state_dict_layers", "hf_folder", "stride0", "torchscript_data_pkl"):
        from tag2mask.clip.loading import load_clip

        load_clip(path)
    elif case == "cam_npz_seed":
        from tag2mask.cli.seed_cmd import read_cam_file

        read_cam_file(path)
    elif case == "cam_npz_eval":
        from tag2mask.evaluation.cam_eval import load_cam_npz

        load_cam_npz(path)
    elif case == "weclip_recipe":  # what loading a WeCLIP checkpoint does with its recipe
        from tag2mask.clip.loading import load_clip
        from tag2mask.methods.weclip.model import WeCLIP, WeCLIPConfig

        config = WeCLIPConfig.from_dict(json.loads(path.read_text()))
        WeCLIP(load_clip(Path(__import__("tag2mask").__file__).parent / "assets" / "tiny_clip.safetensors"), config)
    elif case == "fma_prompt_metadata":  # what building the FMA prompts from a recipe does
        from tag2mask.clip.loading import load_clip
        from tag2mask.methods.fma.prompts import PromptLearner

        clip = load_clip(Path(__import__("tag2mask").__file__).parent / "assets" / "tiny_clip.safetensors")
        PromptLearner(clip, ["cat", "dog"], n_ctx=json.loads(path.read_text())["n_ctx"])
    elif case == "rle_proposal":
        from tag2mask.proposals.rle_files import read_proposals_json

        read_proposals_json(path, image_size=(64, 64))


_CHILD = r"""
import os, resource, sys, json
cap = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
import runpy
import torch, numpy  # imported before the baseline: their own memory is not the loader's
run_loader = runpy.run_path(sys.argv[4])["run_loader"]
from pathlib import Path
import tag2mask.clip.loading, tag2mask.cli.seed_cmd, tag2mask.evaluation.cam_eval, tag2mask.proposals.rle_files
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
base = rss()
try:
    run_loader(sys.argv[1], Path(sys.argv[2]))
    outcome = "loaded"
except MemoryError:
    outcome = "MemoryError (hit the cap)"
except Exception as e:
    outcome = type(e).__name__ + ": " + str(e).splitlines()[0][:160]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_over_baseline_mb": round((peak - base) / 2**20, 1), "outcome": outcome}))
"""


def measure(case: str, path: Path, cap_bytes: int) -> dict:
    """Run the loader of ``case`` on ``path`` in a capped subprocess; its peak RSS over its baseline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _CHILD, case, str(path), str(cap_bytes), str(Path(__file__).resolve())],
                       capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"peak_over_baseline_mb": None, "outcome": f"crashed rc={r.returncode}: {r.stderr.strip()[-200:]}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap-gb", type=float, default=3.0)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            d = Path(tmp) / case
            d.mkdir()
            path = craft(case, d)
            size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
            res = measure(case, path, int(args.cap_gb * 2**30))
            print(json.dumps({"case": case, "file_bytes": size, **res}), flush=True)


if __name__ == "__main__":
    main()
