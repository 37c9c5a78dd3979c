"""``tag2mask eval``: score label maps or CAMs against ground-truth masks.

Examples::

    tag2mask eval runs/voc_val/labels --gt VOC2012/SegmentationClass --classes voc
    tag2mask eval runs/voc_train --cams --gt VOC2012/SegmentationClass --classes voc --bg-powers 1 2
    tag2mask eval preds --gt gt --classes coco --unseen cow motorbike

Images are streamed (one prediction + one GT in memory at a time) into a confusion matrix;
the command prints a table and writes ``eval.json`` (default: inside PRED).

mIoU rule (--miou-rule): gt_or_pred averages over the classes present in the ground truth or the
prediction (CLIP-ES's evaluation), gt over the classes present in the ground truth (WeCLIP's).
auto (default) takes the rule of the method that wrote PRED (its run.json), else gt_or_pred.
Every report states the rule it used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from tag2mask.evaluation.cam_eval import evaluate_cams, load_cam_npz
from tag2mask.evaluation.miou import DEFAULT_MIOU_RULE, MIOU_RULES, ConfusionMatrix, seen_unseen_scores
from tag2mask.vocab import classes as _vocab_classes
from tag2mask.io.atomic import atomic_write_text
from tag2mask.io.palette import read_label_png

__all__ = ["add_parser", "run", "resolve_classes", "evaluate_label_folder", "evaluate_cam_folder"]

VOC_CLASSES = list(_vocab_classes.VOC_CLASSES)
# CLIP-ES's class_names_coco order and spellings (motorbike, aeroplane, sofa, pottedplant, diningtable,
# tvmonitor), the names `tag2mask label --classes coco` uses: label k + 1 = COCO_CLASSES[k]
COCO_CLASSES = list(_vocab_classes.COCO_CLASSES)


def resolve_classes(spec: str, num_classes: int | None = None) -> list[str]:
    """Class names *including background at index 0* for ``voc``, ``coco`` or a FILE.

    FILE: one class per line; only the first comma-separated name of a line is used (the
    rest are synonyms); blank lines and ``#`` comments skipped. Background is prepended
    unless the first name is ``background``. ``num_classes`` overrides the count: extra
    classes are named ``class <k>``; fewer than listed is an error.
    """
    if spec.lower() == "voc":
        names = ["background"] + VOC_CLASSES
    elif spec.lower() == "coco":
        names = ["background"] + COCO_CLASSES
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--classes: expected 'voc', 'coco' or a class file; {spec} not found")
        names = []
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(line.split(",")[0].strip())
        if not names:
            raise ValueError(f"{path}: no class names found")
        if names[0].lower() != "background":
            names = ["background"] + names
    if num_classes is not None:
        if num_classes < len(names):
            raise ValueError(f"--num-classes {num_classes} is smaller than the {len(names)} classes "
                             f"(background included) of --classes {spec}")
        names += [f"class {k}" for k in range(len(names), num_classes)]
    return names


def _resolve_unseen(items: Sequence[str], names: Sequence[str]) -> list[int]:
    """``--unseen`` entries: integer label values (background = 0) or class names."""
    lookup = {n.lower(): i for i, n in enumerate(names)}
    out = []
    for it in items:
        if it.lstrip("-").isdigit():
            k = int(it)
            if not 0 <= k < len(names):
                raise ValueError(f"--unseen: class id {k} outside [0, {len(names)})")
        else:
            if it.lower() not in lookup:
                raise ValueError(f"--unseen: unknown class {it!r}; valid names: {', '.join(names)}")
            k = lookup[it.lower()]
        out.append(k)
    return out


def _pairs(pred_dir: Path, gt_dir: Path, suffix: str) -> list[tuple[str, Path, Path]]:
    """``(stem, pred, gt)`` for every prediction file; every prediction needs a GT."""
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder not found: {gt_dir}")
    preds = sorted(p for p in pred_dir.iterdir() if p.suffix.lower() == suffix and p.is_file())
    if not preds:
        raise FileNotFoundError(f"no *{suffix} prediction files in {pred_dir}")
    out, missing = [], []
    for p in preds:
        g = gt_dir / f"{p.stem}.png"
        if g.is_file():
            out.append((p.stem, p, g))
        else:
            missing.append(g.name)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"ground truth missing in {gt_dir} for {len(missing)} predictions: "
                                f"{', '.join(missing[:5])}{more}")
    return out


def _progress(it: Iterable, total: int, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="img", file=sys.stderr)


def evaluate_label_folder(pred_dir: str | Path, gt_dir: str | Path, num_classes: int,
                          ignore_index: int = 255, progress: bool = False,
                          miou_rule: str = DEFAULT_MIOU_RULE) -> dict:
    """Score ``PRED/<stem>.png`` label maps against ``GT/<stem>.png``, streaming (mIoU by ``miou_rule``).

    Returns:
        ``{"scores": ConfusionMatrix.scores(), "per_image": {stem: mIoU | None},
        "num_images": n}``.
    """
    pairs = _pairs(Path(pred_dir), Path(gt_dir), ".png")
    total = ConfusionMatrix(num_classes, ignore_index)
    per_image: dict[str, float | None] = {}
    for stem, p, g in _progress(pairs, len(pairs), progress, "eval"):
        one = ConfusionMatrix(num_classes, ignore_index)
        one.update(read_label_png(p), read_label_png(g), name=f"{p} vs {g}")
        total.merge(one)
        per_image[stem] = one.scores(miou_rule)["Mean IoU"]
    return {"scores": total.scores(miou_rule), "per_image": per_image, "num_images": len(pairs)}


def evaluate_cam_folder(cam_dir: str | Path, gt_dir: str | Path, num_classes: int,
                        powers: Sequence[float] | None = (1, 2), thresholds: Sequence[float] | None = None,
                        ignore_index: int = 255, progress: bool = False,
                        miou_rule: str = DEFAULT_MIOU_RULE) -> dict:
    """CLIP-ES seed evaluation of ``cams/<stem>.npz`` (or a run folder containing ``cams/``)."""
    cam_dir = Path(cam_dir)
    if (cam_dir / "cams").is_dir():
        cam_dir = cam_dir / "cams"
    pairs = _pairs(cam_dir, Path(gt_dir), ".npz")

    def items() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for _, p, g in _progress(pairs, len(pairs), progress, "eval cams"):
            cams, keys = load_cam_npz(p)
            yield cams, keys, read_label_png(g)

    return evaluate_cams(items(), num_classes, powers=powers, thresholds=thresholds,
                         ignore_index=ignore_index, names=(f"{p} vs {g}" for _, p, g in pairs), miou_rule=miou_rule)


def method_miou_rule(pred: str | Path) -> tuple[str, str]:
    """The mIoU rule of the method that wrote ``pred`` and where it was read: ``(rule, source)``.

    Looks for a ``run.json`` in PRED and its two parents (``label`` records ``miou_rule``; a WeCLIP
    ``segment`` run records ``method: weclip``); falls back to :data:`DEFAULT_MIOU_RULE`.
    """
    from tag2mask.methods.weclip.model import WeCLIPConfig

    here = Path(pred).resolve()
    for folder in (here, *list(here.parents)[:2]):
        record = folder / "run.json"
        if not record.is_file():
            continue
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        rule = data.get("miou_rule")
        if rule is None and data.get("method") == "weclip":
            rule = WeCLIPConfig.__dataclass_fields__["miou_rule"].default
        if rule in MIOU_RULES:
            return rule, str(record)
    return DEFAULT_MIOU_RULE, "default"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:6.2f}"


def format_table(names: Sequence[str], columns: dict[str, dict]) -> str:
    """Markdown-style table: one row per class + summary rows, one column per setting."""
    heads = list(columns)
    width = max(12, *(len(n) for n in names))
    lines = [f"| {'class':<{width}} | " + " | ".join(f"{h:>7}" for h in heads) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * 9 for _ in heads) + "|"]
    for i, n in enumerate(names):
        vals = [columns[h]["Class IoU"][i] for h in heads]
        if all(v is None for v in vals):
            continue  # absent from GT and prediction: excluded, not shown as 0
        lines.append(f"| {n:<{width}} | " + " | ".join(f"{_pct(v):>7}" for v in vals) + " |")
    for key, label in (("Mean IoU", "mIoU"), ("Pixel Accuracy", "pixel acc"), ("Mean Accuracy", "mean acc")):
        lines.append(f"| {label:<{width}} | " + " | ".join(f"{_pct(columns[h][key]):>7}" for h in heads) + " |")
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command."""
    p = subparsers.add_parser("eval", help="score predicted label maps or CAMs against ground truth",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred", metavar="PRED", help="folder of palette PNGs; with --cams, a folder of "
                   "<stem>.npz CAM files or a run folder containing cams/")
    p.add_argument("--gt", required=True, help="folder of ground-truth <stem>.png masks (255 = ignore)")
    p.add_argument("--classes", default="voc", help="voc | coco | FILE (one class per line) [voc]")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes incl. background")
    p.add_argument("--cams", action="store_true", help="evaluate CAMs (CLIP-ES seed protocol)")
    p.add_argument("--bg-powers", type=float, nargs="+", default=[1, 2], help="bg = (1 - max)^p sweep [1 2]")
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="constant background thresholds (replaces --bg-powers)")
    p.add_argument("--unseen", nargs="+", default=None, help="unseen classes (names or label values) for "
                   "seen/unseen mIoU and hIoU")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--miou-rule", default="auto", choices=("auto", *MIOU_RULES),
                   help="which classes the mIoU averages: gt_or_pred (classes in GT or prediction, CLIP-ES), gt "
                   "(classes in GT, WeCLIP), auto = the rule of the method that wrote PRED (its run.json), "
                   "else gt_or_pred (default: auto)")
    p.add_argument("--out", default=None, help="output JSON [PRED/eval.json]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--html", default=None, metavar="DIR",
                   help="also write DIR/index.html with each image, its prediction overlay, the GT overlay and "
                        "its mIoU (needs --images; label maps only)")
    p.add_argument("--images", default=None, help="folder of the input images (<stem>.jpg/.png), for --html")
    p.set_defaults(func=run)
    return p


def write_html_report(html_dir: Path, pred_dir: Path, gt_dir: Path, images: str | None,
                      names: Sequence[str], report: dict) -> None:
    """``html_dir/index.html``: image, prediction overlay, GT overlay and per-image mIoU, worst first."""
    from tag2mask.data.datasets import IMAGE_SUFFIXES
    from tag2mask.data.images import load_image_array
    from tag2mask.io.html_report import write_index_html
    from tag2mask.io.visualize import save_overlay

    if images is None:
        raise ValueError("--html needs --images (the folder of the input images)")
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    fg = list(names[1:])  # overlays name label k as names[k]; their legend takes foreground names
    rows = []
    per_image = report["per_image_miou"]
    for stem in sorted(per_image, key=lambda k: (per_image[k] is None, per_image[k] or 0.0)):
        src = next((image_dir / f"{stem}{ext}" for ext in IMAGE_SUFFIXES if (image_dir / f"{stem}{ext}").is_file()), None)
        if src is None:
            raise FileNotFoundError(f"no image for {stem!r} in {image_dir}")
        rgb = load_image_array(src)
        pred_rel, gt_rel = f"overlays/{stem}.png", f"gt_overlays/{stem}.png"
        save_overlay(html_dir / pred_rel, rgb, read_label_png(pred_dir / f"{stem}.png"), fg)
        save_overlay(html_dir / gt_rel, rgb, read_label_png(gt_dir / f"{stem}.png"), fg)
        rows.append({"name": stem, "image": str(src.resolve()), "overlay": pred_rel, "gt_overlay": gt_rel,
                     "iou": per_image[stem]})
    miou = report["scores"]["Mean IoU"]
    write_index_html(html_dir, rows, title=f"tag2mask eval: {pred_dir}",
                     summary={"images": len(rows), "mIoU": _pct(miou).strip(),
                              "mIoU rule": f"{report['miou_rule']}: {MIOU_RULES[report['miou_rule']]}",
                              "GT": str(gt_dir)})


def _p(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def run(args: argparse.Namespace) -> int:
    """Execute ``tag2mask eval``; returns the exit code (2 on bad input)."""
    try:
        names = resolve_classes(args.classes, args.num_classes)
        unseen = _resolve_unseen(args.unseen, names) if args.unseen else None
        progress = not args.quiet
        rule, rule_source = (args.miou_rule, "--miou-rule") if args.miou_rule != "auto" else method_miou_rule(args.pred)
        if args.cams:
            powers = [_p(v) for v in args.bg_powers]
            res = evaluate_cam_folder(args.pred, args.gt, len(names), powers, args.thresholds,
                                      args.ignore_index, progress, miou_rule=rule)
            columns = {k: v for k, v in res.items() if isinstance(v, dict)}
            report = {"mode": "cams", "num_images": res["num_images"], "class_names": names,
                      "settings": columns, "best": res["best"], "best_miou": res["best_miou"]}
            for k in ("best_p", "best_threshold"):
                if k in res:
                    report[k] = res[k]
        else:
            res = evaluate_label_folder(args.pred, args.gt, len(names), args.ignore_index, progress, miou_rule=rule)
            columns = {"IoU": res["scores"]}
            report = {"mode": "labels", "num_images": res["num_images"], "class_names": names,
                      "scores": res["scores"], "per_image_miou": res["per_image"]}
        report.update(miou_rule=rule, miou_rule_description=MIOU_RULES[rule], miou_rule_source=rule_source)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tag2mask eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(names, columns))
    print(f"mIoU rule: {rule} ({MIOU_RULES[rule]}; from {rule_source})")
    if args.cams:
        print(f"best: {report['best']} (mIoU {_pct(report['best_miou']).strip()})")
    if unseen is not None:
        report["unseen_ids"] = unseen
        report["seen_unseen"] = {}
        for key, sc in columns.items():
            s, u, h = seen_unseen_scores(sc["Class IoU"], unseen)
            report["seen_unseen"][key] = {"mIoU_seen": s, "mIoU_unseen": u, "hIoU": h}
            print(f"{key}: seen {_pct(s).strip()}  unseen {_pct(u).strip()}  hIoU {_pct(h).strip()}")
    if args.html and not args.cams:
        try:
            write_html_report(Path(args.html), Path(args.pred), Path(args.gt), args.images, names, report)
        except (FileNotFoundError, ValueError) as exc:
            print(f"tag2mask eval: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {Path(args.html) / 'index.html'}")
    out = Path(args.out) if args.out else Path(args.pred) / "eval.json"
    atomic_write_text(out, json.dumps(report, indent=1, allow_nan=False))
    print(f"wrote {out}")
    return 0
