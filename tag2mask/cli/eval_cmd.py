"""``tag2mask eval``: score label maps or CAMs against ground-truth masks.

Examples::

    tag2mask eval runs/voc_val/labels --gt VOC2012/SegmentationClass --classes voc
    tag2mask eval runs/voc_train --cams --gt VOC2012/SegmentationClass --classes voc --bg-powers 1 2
    tag2mask eval preds --gt gt --classes coco --unseen cow motorbike
    tag2mask eval runs/zss/eval/masks --gt VOC2012/SegmentationClass --classes voc-15-5 --unseen voc-15-5

Images are streamed (one prediction + one GT in memory at a time) into a confusion matrix;
the command prints a table and writes ``eval.json`` (default: inside PRED).

mIoU rule (--miou-rule): gt_or_pred averages over the classes present in the ground truth or the
prediction (CLIP-ES's evaluation), gt over the classes present in the ground truth (WeCLIP's).
auto (default) takes the rule of the method that wrote PRED (its run.json), else gt_or_pred.
Every report states the rule it used.
A predicted 255 (label --refine crf: "not confident") is not scored; the report counts them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from tag2mask.cmdline.options import given, plain_text, record_given_options, reject_options
from tag2mask.cmdline.classes import resolve_classes, zero_shot_split as _zero_shot_split
from tag2mask.evaluation.rules import DEFAULT_MIOU_RULE, MIOU_RULES
from tag2mask.evaluation.tables import format_table, pct as _pct
from tag2mask.io.atomic import atomic_write_text
from tag2mask.io.json_files import read_json
from tag2mask.cmdline import option_types as ot

if TYPE_CHECKING:  # NumPy and the metric code load with the command, not with ``tag2mask --help``
    import numpy as np

__all__ = ["add_parser", "run", "evaluate_label_folder", "evaluate_cam_folder"]

#: prediction value that is not scored: the "not confident" pixels of ``label --refine crf``
PRED_IGNORE = 255


def _resolve_unseen(items: Sequence[str], names: Sequence[str]) -> list[int]:
    """``--unseen`` entries: integer label values (background = 0), class names, or one split name."""
    split = _zero_shot_split(items[0]) if len(items) == 1 else None
    if split is not None:
        items = list(split.unseen)
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

    A predicted 255 (``label --refine crf``: "not confident") is not scored; the count is returned.

    Returns:
        ``{"scores": ConfusionMatrix.scores(), "per_image": {stem: mIoU | None},
        "num_images": n, "gt_values": sorted label values seen in the GT (ignore and 255 excluded),
        "unscored_pred_pixels": predicted 255 where the GT would score, "pred_pixels": all prediction pixels}``.
    """
    import numpy as np

    from tag2mask.evaluation.miou import ConfusionMatrix, unscore_predicted_ignore
    from tag2mask.io.palette import read_label_png

    pairs = _pairs(Path(pred_dir), Path(gt_dir), ".png")
    total = ConfusionMatrix(num_classes, ignore_index)
    per_image: dict[str, float | None] = {}
    gt_values: set[int] = set()
    unscored = pixels = 0
    for stem, p, g in _progress(pairs, len(pairs), progress, "eval"):
        one = ConfusionMatrix(num_classes, ignore_index)
        gt, pred = read_label_png(g), read_label_png(p)
        gt_values.update(int(v) for v in np.unique(gt) if v not in (ignore_index, 255))
        gt, n = unscore_predicted_ignore(pred, gt, num_classes, ignore_index, PRED_IGNORE)
        unscored += n
        pixels += int(pred.size)
        one.update(pred, gt, name=f"{p} vs {g}")
        total.merge(one)
        per_image[stem] = one.scores(miou_rule)["Mean IoU"]
    return {"scores": total.scores(miou_rule), "per_image": per_image, "num_images": len(pairs),
            "gt_values": sorted(gt_values), "unscored_pred_pixels": unscored, "pred_pixels": pixels}


def evaluate_cam_folder(cam_dir: str | Path, gt_dir: str | Path, num_classes: int,
                        powers: Sequence[float] | None = (1, 2), thresholds: Sequence[float] | None = None,
                        ignore_index: int = 255, progress: bool = False,
                        miou_rule: str = DEFAULT_MIOU_RULE) -> dict:
    """CLIP-ES seed evaluation of ``cams/<stem>.npz`` (or a run folder containing ``cams/``)."""
    from tag2mask.evaluation.cam_eval import evaluate_cams, load_cam_npz
    from tag2mask.io.palette import read_label_png

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
    from tag2mask.methods import registry

    here = Path(pred).resolve()
    for folder in (here, *list(here.parents)[:2]):
        record = folder / "run.json"
        if not record.is_file():
            continue
        try:
            data = read_json(record)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        rule = data.get("miou_rule")
        settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        # both forms: a top-level ``method`` and ``settings.method`` (what ``segment --checkpoint`` writes)
        method = data.get("method") or settings.get("method")
        if rule is None and isinstance(method, str):  # the method's own rule (registry)
            rule = registry.miou_rule_of(method)
        if rule in MIOU_RULES:
            return rule, str(record)
    return DEFAULT_MIOU_RULE, "default"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command."""
    p = subparsers.add_parser("eval", help="score predicted label maps or CAMs against ground truth",
                              description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred", metavar="PRED", help="folder of palette PNGs; with --cams, a folder of "
                   "<stem>.npz CAM files or a run folder containing cams/")
    p.add_argument("--gt", required=True, help="folder of ground-truth <stem>.png masks (255 = ignore)")
    p.add_argument("--classes", default="voc",
                   help="voc, coco, synth, a zero-shot split name (voc-15-5, coco-stuff-156-15, context-49-10, "
                        "synth-9-3: its label order), a class file (one class per line, first comma-separated name used; "
                        "a first line 'background' is allowed) or an inline list 'cat, dog' (default: voc)")
    p.add_argument("--num-classes", type=ot.int_in(2, 255), default=None,
                   help="number of classes incl. background, when more than --classes names (default: from --classes)")
    p.add_argument("--cams", action="store_true", help="evaluate CAMs (CLIP-ES seed protocol)")
    p.add_argument("--bg-powers", type=ot.finite_float(0, 100, lo_open=True), nargs="+", default=[1, 2],
                   help="with --cams: background score (1 - max CAM)^p, one column per p (default: 1 2)")
    p.add_argument("--thresholds", type=ot.finite_float(0, 1), nargs="+", default=None,
                   help="with --cams: constant background thresholds, instead of --bg-powers")
    p.add_argument("--unseen", nargs="+", default=None, help="unseen classes (names or label values) or a zero-shot "
                   "split (voc-15-5, coco-stuff-156-15, context-49-10, synth-9-3) for seen/unseen mIoU and hIoU; a split "
                   "whose protocol ignores the background (voc-15-5, context-49-10) also scores without label 0 unless "
                   "--ignore-index is given")
    p.add_argument("--ignore-index", type=ot.non_negative_int(255, note="a label PNG value"), default=255, help="ground-truth value that is not scored (default: 255)")
    p.add_argument("--miou-rule", default="auto", choices=("auto", *MIOU_RULES),
                   help="which classes the mIoU averages: gt_or_pred (classes in GT or prediction, CLIP-ES), gt "
                   "(classes in GT, WeCLIP), auto = the rule of the method that wrote PRED (its run.json), "
                   "else gt_or_pred (default: auto)")
    p.add_argument("--out", default=None, help="output JSON (default: PRED/eval.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--html", default=None, metavar="DIR",
                   help="label maps only: also write DIR/index.html with the scores, a per-class chart and, per "
                        "image (worst first), the input, the prediction and the ground truth (needs --images)")
    p.add_argument("--images", default=None, help="with --html: folder of the input images (<stem>.jpg, .png, ...)")
    p.set_defaults(func=run)
    record_given_options(p)
    return p


def check_options(args: argparse.Namespace) -> None:
    """Options that do not apply to the chosen mode are errors, not silently ignored."""
    if args.cams:
        reject_options(args, ("html", "images"), "with --cams (the page shows label maps)")
        if args.thresholds is not None:
            reject_options(args, ("bg_powers",), "with --thresholds (they replace the power sweep)")
    else:
        reject_options(args, ("bg_powers", "thresholds"), "without --cams (they turn CAMs into label maps)")
        if args.html is None:
            reject_options(args, ("images",), "without --html")
        elif args.images is None:
            raise ValueError("--html needs --images (the folder of the input images)")


def prediction_run_record(pred_dir: str | Path) -> dict:
    """``run.json`` of the run that wrote the predictions (``PRED`` or its parent), or ``{}``."""
    for folder in (Path(pred_dir), Path(pred_dir).parent):
        try:
            record = read_json(folder / "run.json")
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            return record
    return {}


def _values_text(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values[:12]) + (" ..." if len(values) > 12 else "")


def class_list_warnings(args: argparse.Namespace, names: Sequence[str], gt_values: Sequence[int],
                        run_record: dict) -> list[str]:
    """Signs that --classes does not fit the data: GT values it does not name, a different class list in
    the predictions' run.json or in a classes.txt beside the GT folder."""
    warnings = []
    which = f"--classes {args.classes}"
    beyond = [v for v in gt_values if v >= len(names)]
    if beyond:
        warnings.append(f"the ground truth holds label values {_values_text(beyond)} that {which} ({len(names)} classes "
                        "with background) does not name; their pixels were not scored. Is --classes right?")
    if "label_values" in run_record:  # tag2mask segment: {class name: label value}
        run_names = {int(v): str(k) for k, v in run_record["label_values"].items()}
    elif "classes" in run_record:  # tag2mask label: foreground names, label value = index + 1
        run_names = {i + 1: str(n) for i, n in enumerate(run_record["classes"])}
    elif "class_names" in run_record:  # tag2mask segment --checkpoint: label value = index
        run_names = {i: str(n) for i, n in enumerate(run_record["class_names"])}
    else:
        run_names = {}
    differ = [v for v, n in sorted(run_names.items()) if v < len(names) and n.lower() != names[v].lower()]
    if differ or any(v >= len(names) for v in run_names):
        v = (differ or [max(run_names)])[0]
        ours = names[v] if v < len(names) else "nothing"
        warnings.append(f"the predictions' run (run.json) writes label value {v} for {run_names[v]!r}, but {which} "
                        f"calls it {ours!r}; pass the run's classes to --classes")
    listed = Path(args.gt).parent / "classes.txt"
    if listed.is_file():
        theirs = [ln.split(",")[0].strip() for ln in listed.read_text(encoding="utf-8-sig").splitlines()
                  if ln.strip() and not ln.startswith("#")]
        theirs = theirs[1:] if theirs and theirs[0].lower() == "background" else theirs
        if [n.lower() for n in theirs] != [n.lower() for n in names[1:1 + len(theirs)]] or len(theirs) != len(names) - 1:
            from tag2mask.synth.export import is_synthetic_export

            fix = "synth" if is_synthetic_export(listed.parent) else str(listed)
            warnings.append(f"{listed} lists {len(theirs)} classes ({', '.join(theirs[:6])}{' ...' if len(theirs) > 6 else ''}), "
                            f"not the {len(names) - 1} of {which}; pass --classes {fix}")
    return warnings


def coverage_note(gt_dir: str | Path, num_scored: int) -> str | None:
    """Says so when the GT folder has masks without a prediction (they are not in the score)."""
    gt_total = sum(1 for p in Path(gt_dir).iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if gt_total <= num_scored:
        return None
    return (f"{num_scored:,} predictions were scored; the ground-truth folder has {gt_total:,} masks, so "
            f"{gt_total - num_scored:,} images have no prediction and are not part of the score")


def write_html_report(html_dir: Path, pred_dir: Path, gt_dir: Path, images: str | None,
                      names: Sequence[str], report: dict) -> Path:
    """``html_dir/index.html``: scores, per-class IoU chart, then input / prediction / GT per image, worst first."""
    import numpy as np

    from tag2mask.data.datasets import find_image
    from tag2mask.data.images import load_image_array
    from tag2mask.io.html_report import GridCell, GridRow, Table, format_percent, write_report
    from tag2mask.io.palette import read_label_png
    from tag2mask.io.visualize import legend_entries, save_overlay

    if images is None:
        raise ValueError("--html needs --images (the folder of the input images)")
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    fg = list(names[1:])  # overlays name label k as names[k]; the legend takes foreground names
    per_image = report["per_image_miou"]
    rows, present = [], set()
    for stem in sorted(per_image, key=lambda k: (per_image[k] is None, per_image[k] or 0.0)):
        src = find_image(image_dir, stem)
        if not src.is_file():
            raise FileNotFoundError(f"no image for {stem!r} in {image_dir}")
        rgb = load_image_array(src)
        pred, gt = read_label_png(pred_dir / f"{stem}.png"), read_label_png(gt_dir / f"{stem}.png")
        present.update(int(v) for v in np.unique(np.concatenate([pred.ravel(), gt.ravel()])) if 0 < v < len(names))
        pred_rel, gt_rel = f"overlays/{stem}.png", f"gt_overlays/{stem}.png"
        save_overlay(html_dir / pred_rel, rgb, pred, fg, legend=False)
        save_overlay(html_dir / gt_rel, rgb, gt, fg, legend=False)
        rows.append(GridRow(stem, [GridCell(src.resolve()), GridCell(pred_rel, f"mIoU {format_percent(per_image[stem])}"),
                                   GridCell(gt_rel)]))
    scores = report["scores"]
    class_rows = [(n, iou) for n, iou in zip(names, scores["Class IoU"]) if iou is not None]
    summary = {"images": len(rows), "mIoU": f"{format_percent(scores['Mean IoU'])} %",
               "pixel accuracy": f"{format_percent(scores['Pixel Accuracy'])} %",
               "mean accuracy": f"{format_percent(scores['Mean Accuracy'])} %",
               "mIoU rule": f"{report['miou_rule']}: {MIOU_RULES[report['miou_rule']]}",
               "classes": f"{report['classes_spec']} ({len(names)} with background)",
               "predictions": str(pred_dir), "ground truth": str(gt_dir)}
    notes = [f"mIoU is computed over all images at once: {MIOU_RULES[report['miou_rule']]}. Images "
             "are sorted worst first; the number under each prediction is that image's mIoU."] + report.get("notes", [])
    return write_report(
        html_dir, f"tag2mask eval: {pred_dir}", warnings=report.get("warnings", []), notes=notes, summary=summary,
        table=Table(["class", "IoU (%)"], [(n, format_percent(v)) for n, v in class_rows], numeric=("IoU (%)",)),
        chart=("IoU (%) per class", [(n, 100 * v) for n, v in class_rows]),
        legend=legend_entries(fg, sorted(present)), grid=(["input", "prediction", "ground truth"], rows),
        grid_title="Images, worst first (click an image for full size)",
    )


def _p(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def run(args: argparse.Namespace) -> int:
    """Execute ``tag2mask eval``; returns the exit code (2 on bad input)."""
    from tag2mask.evaluation.miou import seen_unseen_scores

    try:
        check_options(args)
        names = resolve_classes(args.classes, args.num_classes)
        unseen = _resolve_unseen(args.unseen, names) if args.unseen else None
        split = _zero_shot_split(args.unseen[0]) if args.unseen and len(args.unseen) == 1 else None
        if split is not None and split.background == "ignore" and not given(args, "ignore_index"):
            args.ignore_index = 0  # ZegCLIP's reduce_zero_label: background is neither trained nor scored
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
            gt_values: list[int] = []
        else:
            res = evaluate_label_folder(args.pred, args.gt, len(names), args.ignore_index, progress, miou_rule=rule)
            columns = {"IoU": res["scores"]}
            report = {"mode": "labels", "num_images": res["num_images"], "class_names": names,
                      "scores": res["scores"], "per_image_miou": res["per_image"]}
            gt_values = res["gt_values"]
            report.update(unscored_pred_pixels=res["unscored_pred_pixels"], pred_pixels=res["pred_pixels"])
        report.update(miou_rule=rule, miou_rule_description=MIOU_RULES[rule], miou_rule_source=rule_source)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tag2mask eval: error: {exc}", file=sys.stderr)
        return 2
    run_record = prediction_run_record(args.pred)
    report["classes_spec"] = args.classes
    report["warnings"] = class_list_warnings(args, names, gt_values, run_record) + list(run_record.get("warnings", []))
    note = coverage_note(args.gt, report["num_images"])
    report["notes"] = [note] if note else []
    if report.get("unscored_pred_pixels"):
        from tag2mask.evaluation.miou import unscored_note

        report["notes"].append(unscored_note(report["unscored_pred_pixels"], report["pred_pixels"]))
    if args.unseen and _zero_shot_split(args.unseen[0]) is not None and args.ignore_index == 0:
        report["notes"].append(f"{args.unseen[0]}: label 0 (background) is not scored, as in ZegCLIP's protocol")
    for text in report["warnings"]:
        print(f"warning: {text}", file=sys.stderr)
    for text in report["notes"]:
        print(f"note: {text}", file=sys.stderr)
    print(format_table(names, columns))
    print(f"mIoU rule: {rule} ({MIOU_RULES[rule]}; from {rule_source})")
    if args.cams:
        print(f"best: {report['best']} (mIoU {_pct(report['best_miou']).strip()})")
    if unseen is not None:
        report["unseen_ids"] = unseen
        report["seen_unseen"] = {}
        for key, sc in columns.items():
            s, u, h = seen_unseen_scores(sc["Class IoU"], unseen,
                                         include_background=split is None or split.background == "class")
            report["seen_unseen"][key] = {"mIoU_seen": s, "mIoU_unseen": u, "hIoU": h}
            print(f"{key}: seen {_pct(s).strip()}  unseen {_pct(u).strip()}  hIoU {_pct(h).strip()}")
    if args.html:
        try:
            page = write_html_report(Path(args.html), Path(args.pred), Path(args.gt), args.images, names, report)
        except (FileNotFoundError, ValueError) as exc:
            print(f"tag2mask eval: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {page}")
    out = Path(args.out) if args.out else Path(args.pred) / "eval.json"
    atomic_write_text(out, json.dumps(report, indent=1, allow_nan=False))
    print(f"wrote {out}")
    return 0
