"""How far each deliberate ``default`` choice moves the open-vocabulary methods from ``published``.

    python benchmarks/ovss_presets.py --n 100

Two tables:

1. **Official fixtures** (``tests/data/ovss``, the official code's outputs at its fixture settings): for
   every fixture method, the published preset and then one setting changed at a time to what
   ``default`` (or an older tag2mask) does: max |Δ| of the full-resolution prompt logits against the
   official ones, and the label pixels that differ (of all fixture pixels).
2. **Synthetic world** (synth val, the shipped tiny CLIP, its training template ``a photo of a {}.``):
   mIoU of ``default``, ``published`` and ``published`` with one setting changed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tag2mask.cmdline.options import shipped_weights_path
from tag2mask.clip.loading import load_clip
from tag2mask.cli.demo_scenes import SYNTH_TEMPLATES
from tag2mask.evaluation.miou import ConfusionMatrix
from tag2mask.methods.ovss.presets import get_preset
from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
from tag2mask.synth.splits import SyntheticDataset
from tag2mask.synth.world import OBJECT_NAMES
from tag2mask.vocab.vocabulary import get_vocabulary, load_vocabulary

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "data" / "ovss"
MODEL_TYPES = {"ClearCLIP": "clearclip", "vanilla": "clip-reduced", "MaskCLIP": "maskclip-reduced"}


def _fixture_preset(key: str, settings: dict):
    """The published preset of fixture method ``key`` at the fixture's settings (as the tests map it)."""
    method = "clearclip" if "model_type" in settings else ("naclip" if "attn_strategy" in settings else key)
    changes = dict(short_side=settings["short"], logit_scale=float(settings["logit_scale"]),
                   prob_threshold=float(settings["prob_thd"]), area_threshold=settings.get("area_thd"),
                   pamr=bool(settings.get("pamr_steps")))
    if settings["crop"] > 0:
        changes.update(mode="slide", crop=settings["crop"], stride=settings["stride"])
    else:
        changes["mode"] = "whole"
    if "model_type" in settings:
        changes["last_block"] = MODEL_TYPES[settings["model_type"]]
    return method, get_preset(method, "published").replace(**changes)


def fixture_table(tiny: Path) -> list[str]:
    index = json.loads((FIXTURES / "index.json").read_text())
    rows = ["| fixture method | variant | max abs diff of logits | label pixels differing |", "|---|---|---|---|"]
    with _TempNames(index["names"]) as names:
        vocab = load_vocabulary(str(names), first_line_background=True)
        model = load_clip(tiny)
        for key, meta in index["methods"].items():
            method, published = _fixture_preset(key, meta["settings"])
            variants = {"published (official)": published,
                        "full-precision weights": published.replace(round_fp16_weights=False),
                        "model numerics (bilinear pos-emb, CLIP mean/std)": published.replace(numerics="model")}
            if published.pamr:
                variants["PAMR guided by the original image"] = published.replace(pamr_guide="image")
                variants["PAMR off (label vs official PAMR label)"] = published.replace(pamr=False)
            if published.window_padding == "centre":
                variants["windows not padded"] = published.replace(window_padding="none")
            for name, preset in variants.items():
                seg = OpenVocabSegmenter(model, vocab, method, preset=preset, text_cache=False)
                worst, wrong, total = 0.0, 0, 0
                for image in index["images"]:
                    with np.load(FIXTURES / f"{image}.npz") as z:
                        ref = {k: z[k] for k in z.files if k.startswith(key + ".") or k == "image"}
                    res = seg.predict(Image.fromarray(ref["image"]), keep_arrays=True)
                    pamr_ref = published.pamr and preset.pamr
                    ref_logits = ref[f"{key}.logits_pamr"] if pamr_ref else ref[f"{key}.logits"]
                    ours = res.arrays["logits_pamr"] if preset.pamr else res.arrays["logits"]
                    ref_label = ref[f"{key}.label_pamr"] if published.pamr else ref[f"{key}.label"]
                    worst = max(worst, float(np.abs(ours - ref_logits).max()))
                    wrong += int((res.label != ref_label).sum())
                    total += res.label.size
                rows.append(f"| {key} | {name} | {worst:.1e} | {wrong} / {total} |")
    return rows


class _TempNames:
    """The fixture name set as an official cls_*.txt in a temporary file."""

    def __init__(self, lines: list[str]):
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "cls_fixture.txt"
        self.path.write_text("\n".join(lines), encoding="utf-8")

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.dir.cleanup()


def synth_table(n: int, weights) -> list[str]:
    model = load_clip(weights or shipped_weights_path())
    vocab = get_vocabulary("synth")
    data = SyntheticDataset("val", n, 224)
    scenes = [data[i] for i in range(n)]
    rows = ["| method | variant | mIoU (%) | s / image |", "|---|---|---|---|"]
    for method in ("maskclip", "sclip", "clearclip", "naclip"):
        published, default = get_preset(method, "published"), get_preset(method, "default")
        variants = {"default": default, "published": published,
                    "published, full-precision weights": published.replace(round_fp16_weights=False),
                    "published at short side 448": published.replace(short_side=448)}
        if published.pamr:
            variants["published, PAMR off"] = published.replace(pamr=False)
            variants["published, PAMR guided by the original image"] = published.replace(pamr_guide="image")
            variants["default + PAMR"] = default.replace(pamr=True)
        if method != "maskclip":
            variants["default with model numerics (before presets)"] = default.replace(numerics="model")
        for name, preset in variants.items():
            seg = OpenVocabSegmenter(model, vocab, method, preset=preset, templates=list(SYNTH_TEMPLATES),
                                     text_cache=False)
            cm = ConfusionMatrix(len(OBJECT_NAMES) + 1)
            t0 = time.perf_counter()
            for scene in scenes:
                cm.update(seg.predict(Image.fromarray(scene.image)).label, scene.mask)
            seconds = (time.perf_counter() - t0) / n
            rows.append(f"| {method} | {name} | {100 * (cm.scores()['Mean IoU'] or 0.0):.1f} | {seconds:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="synthetic scenes (default 100)")
    ap.add_argument("--weights", default=None, help="CLIP weights for the synthetic table (default: the shipped tiny CLIP)")
    ap.add_argument("--skip-synth", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("\n".join(fixture_table(ROOT / "tests" / "data" / "tiny_clip" / "tiny_clip_vit16_openai.pt")))
    if not args.skip_synth:
        print()
        print("\n".join(synth_table(args.n, args.weights)))


if __name__ == "__main__":
    main()
