"""``tag2mask demo``: the whole library on synthetic scenes, offline, in a couple of minutes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tag2mask.cmdline.options import add_device_option, add_weights_options, record_given_options
from tag2mask.methods import registry
from tag2mask.cmdline import option_types as ot

#: every name ``--methods`` accepts (CLIP-ES with its variants, the open-vocabulary methods); ``all``, the
#: default, runs those the loaded CLIP and the given options can run (the others are named with the reason)
DEFAULT_METHODS = registry.demo_methods()


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
    p.add_argument("--out", default="tag2mask-demo", help="output folder (default: tag2mask-demo)")
    p.add_argument("--n", type=ot.positive_int(1_000_000), default=8, help="number of scenes (default: 8)")
    p.add_argument("--size", type=ot.int_in(16, ot.MAX_SIDE), default=224, help="scene size in pixels (default: 224)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["all"],
        help=f"methods to run: all (the default) or some of {' '.join(DEFAULT_METHODS)}. 'all' skips, with "
        "the reason, a method the CLIP cannot run (scclip needs 11+ blocks) or whose inputs are not given "
        "(corrclip: --dino and --regions) and clip-es+crf without the 'crf' extra; naming such a method is an error",
    )
    add_weights_options(p)
    add_device_option(p)
    registry.add_input_options(p)  # the inputs some methods need (CorrCLIP: --dino, --regions)
    p.set_defaults(func=run)
    record_given_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from tag2mask.cmdline.options import load_model_from_args
    from tag2mask.cli.demo_scenes import evaluate_methods, results_table, write_results_json
    from tag2mask.io.palette import save_label_png
    from tag2mask.io.visualize import save_overlay
    from tag2mask.synth.world import OBJECT_NAMES

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    everything = "all" in args.methods
    if everything and len(args.methods) > 1:
        raise ValueError("--methods all runs every method; give it alone or name the methods")
    methods = list(DEFAULT_METHODS) if everything else list(dict.fromkeys(args.methods))
    unknown = [m for m in methods if m not in DEFAULT_METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {['all', *DEFAULT_METHODS]}")
    registry.check_input_options(args, "demo")  # before the model loads: a misuse fails fast
    with_crf = "clip-es+crf" in methods
    if with_crf:
        import importlib.util

        if importlib.util.find_spec("pydensecrf") is None:
            print("demo: pydensecrf is not installed (pip install 'tag2mask[crf]'); skipping clip-es+crf", file=sys.stderr)
            methods.remove("clip-es+crf")
            with_crf = False

    model = load_model_from_args(args)
    inputs = registry.method_inputs(methods, model, args)
    methods = runnable_methods(methods, model, inputs, skip=everything)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes: list[dict] = []
    names = list(OBJECT_NAMES)  # overlays colour label k with the palette; the page's legend names them

    def on_image(i: int, image, gt, outputs, tags) -> None:
        stem = f"scene_{i:03d}"
        rgb = np.asarray(image)
        image.save(out / "images" / f"{stem}.png")
        # overlay and flat mask side by side: a blend over coloured shapes alone looks like the input
        save_overlay(out / "overlays" / "ground_truth" / f"{stem}.png", rgb, gt, names, beside_mask=True)
        scene = {"name": stem, "tags": list(tags), "image": f"images/{stem}.png",
                 "ground_truth": f"overlays/ground_truth/{stem}.png", "overlays": {}}
        for method, pred in outputs.items():
            save_label_png(out / "masks" / method / f"{stem}.png", pred)
            rel = f"overlays/{method}/{stem}.png"
            save_overlay(out / rel, rgb, pred, names, beside_mask=True)
            scene["overlays"][method] = rel
        scenes.append(scene)

    scores = evaluate_methods(
        model,
        args.n,
        methods,
        size=args.size,
        with_crf=with_crf,
        inputs=inputs,
        on_image=on_image,
        progress=lambda it: tqdm(it, desc="demo", unit="scene", file=sys.stderr),
    )
    write_demo_page(out, scenes, scores, model, args)
    write_results_json(out / "results.json", scores)
    print(f"tag2mask demo: {args.n} synthetic scenes, tiny CLIP shipped with tag2mask" if args.weights is None else f"tag2mask demo: {args.n} scenes, weights {args.weights}")
    print(results_table(scores, args.n))
    print(f"wrote {out / 'index.html'} and {out / 'results.json'}")
    return 0


def runnable_methods(methods: list[str], model, inputs: dict, skip: bool) -> list[str]:
    """``methods`` the model and ``inputs`` can run (registry ``supports`` / ``needs``): with ``skip``
    (``--methods all``) the others are left out with one line each on stderr, else they are an error."""
    runnable, why_not = registry.offered(methods, model, inputs)
    if why_not and not skip:
        raise ValueError("; ".join(f"{m} cannot run here: {why}" for m, why in why_not.items()))
    for method, why in why_not.items():
        print(f"demo: skipping {method}: {why}", file=sys.stderr)
    return list(runnable)


def write_demo_page(out: Path, scenes: list[dict], scores, model, args: argparse.Namespace) -> Path:
    """``out/index.html``: what each method is and how it scored, then one row of overlays per scene."""
    from tag2mask.clip.shipped import TINY_CLIP_NOTE, is_shipped_tiny_clip
    from tag2mask.cli.demo_scenes import METHOD_INFO
    from tag2mask.io.html_report import GridCell, GridRow, Table, format_percent, write_report
    from tag2mask.io.visualize import legend_entries
    from tag2mask.synth.world import OBJECT_NAMES

    n = len(scenes)
    notes = []
    if is_shipped_tiny_clip(model):
        notes.append("About the model: " + TINY_CLIP_NOTE[0].upper() + TINY_CLIP_NOTE[1:]
                     + " These scenes are that world, so the scores below compare the methods; they say "
                     "nothing about real photos.")
    notes.append(f"Each method segments {n} synthetic scenes with exact ground truth. The CLIP-ES family is told "
                 "each scene's tags (image-level labels); the open-vocabulary methods are told only the "
                 f"{len(OBJECT_NAMES)} class names and must find which are present. mIoU is computed over all "
                 "scenes at once (background included); the number under each overlay is that scene's mIoU. "
                 "Each cell shows the overlay (left) and the flat mask (right). ms / image excludes a warm-up "
                 "pass of every method on the first scene.")
    rows = []
    for m, s in scores.items():
        what, told = METHOD_INFO.get(m, ("", ""))
        rows.append([m, what, told, format_percent(s.miou), f"{1000 * s.seconds / max(1, n):.0f}"])
    table = Table(["method", "what it is", "told", "mIoU (%)", "ms / image"], rows, numeric=("mIoU (%)", "ms / image"))
    chart = ("mIoU (%) per method", [(m, 100 * s.miou) for m, s in scores.items()])
    device = next(model.parameters()).device
    summary = {
        "scenes": f"{n} synthetic test scenes, {args.size} x {args.size} px",
        "model": "the tiny CLIP shipped with tag2mask" if args.weights is None else str(args.weights),
        "device": str(device),
    }
    methods = list(scores)
    grid_rows = []
    for i, scene in enumerate(scenes):
        cells = [GridCell(scene["image"]), GridCell(scene["ground_truth"])]
        cells += [GridCell(scene["overlays"].get(m), f"mIoU {format_percent(scores[m].per_image[i])}") for m in methods]
        grid_rows.append(GridRow(scene["name"], cells, detail="tags: " + ", ".join(scene["tags"])))
    return write_report(
        out, f"tag2mask demo: {n} synthetic scenes", notes=notes, summary=summary, table=table, chart=chart,
        legend=legend_entries(list(OBJECT_NAMES)), grid=(["input", "ground truth", *methods], grid_rows),
        grid_title="Scenes (click an image for full size)",
    )
