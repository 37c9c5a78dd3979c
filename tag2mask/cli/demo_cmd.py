"""``tag2mask demo``: the whole library on synthetic scenes, offline, in a couple of minutes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tag2mask.cli.common import add_device_option, add_weights_options

DEFAULT_METHODS = ("gradcam", "clip-es", "clip-es+pamr", "clip-es+crf", "maskclip", "sclip", "clearclip", "naclip")


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="offline demo: synthetic scenes -> CLIP-ES and MaskCLIP-family masks, overlays, mIoU table",
        description=(
            "Generate synthetic scenes (exact ground truth), run the training-free methods with the tiny "
            "CLIP shipped with tag2mask, and write overlays, index.html and results.json "
            "({method: mIoU}) into --out. No downloads. CLIP-ES uses each scene's image-level labels; "
            "the open-vocabulary methods get only the class names."
        ),
    )
    p.add_argument("--out", default="tag2mask-demo", help="output folder (default: ./tag2mask-demo)")
    p.add_argument("--n", type=int, default=8, help="number of scenes (default 8)")
    p.add_argument("--size", type=int, default=224, help="scene size in pixels (default 224)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"methods to run (default: all of {', '.join(DEFAULT_METHODS)}; clip-es+crf needs the 'crf' extra "
        "and is skipped with a note when it is missing)",
    )
    add_weights_options(p)
    add_device_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from tag2mask.cli.common import load_model_from_args
    from tag2mask.demo import evaluate_methods, results_table, write_results_json
    from tag2mask.io.html_report import write_index_html
    from tag2mask.io.palette import save_label_png
    from tag2mask.io.visualize import save_overlay
    from tag2mask.synth.world import OBJECT_NAMES

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    methods = list(dict.fromkeys(args.methods))
    unknown = [m for m in methods if m not in DEFAULT_METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {list(DEFAULT_METHODS)}")
    with_crf = "clip-es+crf" in methods
    if with_crf:
        import importlib.util

        if importlib.util.find_spec("pydensecrf") is None:
            print("demo: pydensecrf is not installed (pip install 'tag2mask[crf]'); skipping clip-es+crf", file=sys.stderr)
            methods.remove("clip-es+crf")
            with_crf = False

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    model = load_model_from_args(args)
    rows: list[dict] = []
    names = list(OBJECT_NAMES)  # overlay legends take foreground names (label k -> names[k - 1])

    def on_image(i: int, image, gt, outputs) -> None:
        stem = f"scene_{i:03d}"
        rgb = np.asarray(image)
        image.save(out / "images" / f"{stem}.png")
        save_overlay(out / "overlays" / "ground_truth" / f"{stem}.png", rgb, gt, names)
        row = {"name": stem, "image": f"images/{stem}.png", "overlays": {"ground truth": f"overlays/ground_truth/{stem}.png"}}
        for method, pred in outputs.items():
            save_label_png(out / "masks" / method / f"{stem}.png", pred)
            rel = f"overlays/{method}/{stem}.png"
            save_overlay(out / rel, rgb, pred, names)
            row["overlays"][method] = rel
        rows.append(row)

    scores = evaluate_methods(
        model,
        args.n,
        methods,
        size=args.size,
        with_crf=with_crf,
        on_image=on_image,
        progress=lambda it: tqdm(it, desc="demo", unit="scene", file=sys.stderr),
    )
    for i, row in enumerate(rows):
        row["iou"] = {m: s.per_image[i] for m, s in scores.items()}
    summary = {f"{m} mIoU": f"{100 * s.miou:.1f}%" for m, s in scores.items()}
    write_index_html(out, _html_rows(rows, scores), title="tag2mask demo (synthetic scenes)", summary=summary)
    write_results_json(out / "results.json", scores)
    print(f"tag2mask demo: {args.n} synthetic scenes, tiny CLIP shipped with tag2mask" if args.weights is None else f"tag2mask demo: {args.n} scenes, weights {args.weights}")
    print(results_table(scores, args.n))
    print(f"wrote {out / 'index.html'} and {out / 'results.json'}")
    return 0


def _html_rows(rows: list[dict], scores) -> list[dict]:
    """One row per (scene, method) in the format of :func:`write_index_html`."""
    out = []
    for row in rows:
        for method, rel in row["overlays"].items():
            out.append(
                {
                    "name": f"{row['name']} - {method}",
                    "image": row["image"],
                    "overlay": rel,
                    "iou": row["iou"].get(method),
                }
            )
    return out
