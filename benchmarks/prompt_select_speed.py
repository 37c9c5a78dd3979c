"""`prompts select` ranking time: images encoded once (now) against once per template (before).

Both run in this one invocation on the same images, templates and model, alternating, so load
affects them alike: "before" is the former loop (every template re-encodes every image through
``clip_class_probabilities``), "after" is :func:`tag2mask.methods.clip_es.prompt_selection.rank_templates`.
The two rankings are checked to agree. Prints a markdown row with machine, load and date.

    python benchmarks/prompt_select_speed.py --images 20 --templates builtin
    python benchmarks/prompt_select_speed.py --weights ViT-B-16.pt --images 20 --size 320 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np
import torch
from PIL import Image

from tag2mask.methods.clip_es.prompts_cli import resolve_templates
from tag2mask.clip import load_clip, tiny_clip_path
from tag2mask.clip.text_embed import embed_vocabulary
from tag2mask.methods.clip_es.prompt_selection import clip_class_probabilities, rank_templates, sharpness
from tag2mask.synth import SyntheticDataset
from tag2mask.vocab.vocabulary import Vocabulary, get_vocabulary


def rank_reencoding(model, images, labels, vocab, templates) -> list[tuple[str, float]]:
    """The former loop: every template classifies every image again (images encoded len(templates) times)."""
    classes_only = Vocabulary(vocab.names, vocab.synonyms, (), vocab.mode)
    out = []
    for template in templates:
        fg, _ = embed_vocabulary(model, classes_only, [template], cache_dir=False)
        probs = clip_class_probabilities(model, images, fg.features, fg.class_index, len(vocab))
        own = [probs[n, list(dict.fromkeys(ids))] for n, ids in enumerate(labels)]
        out.append((template, sharpness(own)[0]))
    return sorted(out, key=lambda r: (np.isnan(r[1]), r[1]))


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="CLIP weights (default: the shipped tiny CLIP)")
    ap.add_argument("--images", type=int, default=20, help="synthetic images (default: 20)")
    ap.add_argument("--size", type=int, default=224, help="image side (default: 224)")
    ap.add_argument("--templates", default="builtin", help="as `prompts select --templates` (default: builtin)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = load_clip(args.weights or tiny_clip_path(), device=args.device)
    data = SyntheticDataset("val", args.images, args.size)
    images = [Image.fromarray(s.image) for s in data]
    labels = [[c - 1 for c in s.labels] for s in data]
    vocab = get_vocabulary("synth")
    templates = resolve_templates(args.templates)
    load_before = _load()
    t0 = time.perf_counter()
    before = rank_reencoding(model, images, labels, vocab, templates)
    t1 = time.perf_counter()
    after = rank_templates(model, images, labels, vocab, templates)
    t2 = time.perf_counter()
    assert [t for t, _ in before] == [r.template for r in after], "the two rankings differ"
    np.testing.assert_allclose([v for _, v in before], [r.sharpness for r in after], rtol=1e-6)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.node()} ({cpu}, {os.cpu_count()} CPUs), device {args.device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; load average (1/5/15 min) {load_before} -> {_load()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| model | images | templates | before: encode per template (s) | after: encode once (s) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    name = "tiny CLIP (shipped)" if args.weights is None else os.path.basename(args.weights)
    print(f"| {name} | {len(images)} ({args.size} px) | {len(templates)} | {t1 - t0:.2f} | {t2 - t1:.2f} | "
          f"{(t1 - t0) / (t2 - t1):.1f}x |")


if __name__ == "__main__":
    main()
