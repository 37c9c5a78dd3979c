"""The TagCLIP tag job's parts, shared by ``tag2mask tag`` (:mod:`.cli`) and ``label --method tagclip``
(:mod:`.segment`): the tagger of ``--weights``, the per-image work (``scores/<image>.json``), the
run-level files written over all finished images, ground-truth tags for the metrics.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Optional

__all__ = ["load_tagger", "tag_item_fn", "finalize_tags", "gt_tags", "item_source"]


def load_tagger(args: argparse.Namespace, config):
    """The unrounded model of ``--weights`` / ``--device`` and its :class:`TagCLIP` (``tag`` and ``label --method tagclip``)."""
    from tag2mask.cmdline.options import load_model_from_args
    from tag2mask.methods.tagclip.tagger import TagCLIP

    model = load_model_from_args(args, official_rounding=False)  # the tagger never rounds weights (spec 2.1)
    return model, TagCLIP(model, config)


def tag_item_fn(tagger, items, out: Path, save_arrays: bool):
    """The per-image work of the job: tag one item, write ``scores/<name>.json`` (and its arrays)."""
    import numpy as np

    from tag2mask.data.images import load_image
    from tag2mask.io.atomic import atomic_path, atomic_write_text
    from tag2mask.io.uri_inputs import relative_input
    from tag2mask.jobs.items import ItemOutput

    names = tagger.class_names

    def process(sample, data: Optional[bytes] = None) -> ItemOutput:
        """``data``: the image file's bytes when already read (the Ray engine); decoded by the same rules."""
        res = tagger(load_image(sample.image_path, data=data), keep_arrays=save_arrays)
        rel = relative_input(sample.image_path, items.image_dir)  # a URI prefix's key, too
        rec = {"image": rel, "scores": [float(s) for s in res.scores], "tags": res.tags,
               "tag_names": [names[c] for c in res.tags], "info": res.info}
        path = out / "scores" / f"{sample.name}.json"
        atomic_write_text(path, json.dumps(rec) + "\n")
        outputs = [path]
        if save_arrays:
            arr = out / "arrays" / f"{sample.name}.npz"
            with atomic_path(arr) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, **res.arrays)
            outputs.append(arr)
        return ItemOutput(outputs, info={"tags": rec["tag_names"]})

    return process


def finalize_tags(run_dir: Path, items, config, preset: str, gt_path: Optional[str], result: dict) -> None:
    """Collect every finished image's scores into the run-level files (rank 0, after the manifest)."""
    import numpy as np

    from tag2mask.io.atomic import atomic_write_text
    from tag2mask.io.json_files import read_json
    from tag2mask.methods.tagclip.tagfile import gt_matrix, write_tag_lines, write_tags_json

    names, files, scores, tags = [], [], [], []
    for name in items.names:
        path = run_dir / "scores" / f"{name}.json"
        if not path.is_file():
            continue  # failed or not reached (--limit): absent from the run-level files
        rec = read_json(path)  # a damaged record is one line naming its file
        names.append(name)
        files.append(rec["image"])
        scores.append(rec["scores"])
        tags.append(rec["tags"])
    cls = config.class_names
    write_tags_json(run_dir / "tags.json", {f: [cls[c] for c in t] for f, t in zip(files, tags)})
    write_tag_lines(run_dir / "tagclip.txt", list(zip(names, tags)))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *cls])
    for f, s in zip(files, scores):
        writer.writerow([f, *(f"{v:.9g}" for v in s)])
    atomic_write_text(run_dir / "scores.csv", buf.getvalue())
    result["tagged"] = len(names)
    if gt_path is None or not names:
        return
    from tag2mask.methods.tagclip.metrics import classification_metrics

    gt = gt_tags(gt_path, names, files, preset, cls)
    y, kept = gt_matrix(names, gt, config.num_classes)
    if not kept:
        raise ValueError(f"--gt {gt_path}: none of the {len(names)} tagged images is listed")
    rows = [names.index(n) for n in kept]
    metrics = classification_metrics(np.asarray(scores, dtype=np.float32)[rows], y, config.theta, cls)
    metrics["images_without_gt"] = len(names) - len(kept)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    result["metrics"] = metrics


def gt_tags(path: str, names: list[str], files: list[str], preset: str, class_names) -> dict[str, list[int]]:
    """Ground truth ``{item name: [class id]}`` from a label file (names) or official id lines."""
    from tag2mask.methods.tagclip.presets import coco_stuff_182_to_171
    from tag2mask.methods.tagclip.tagfile import read_tag_lines

    p = Path(path)
    if p.suffix.lower() in (".json", ".csv"):
        from tag2mask.data.tag_files import names_to_ids, read_labels_file

        by_file = {k.replace("\\", "/"): v for k, v in read_labels_file(p).items()}
        out = {}
        for name, file in zip(names, files):
            entry = by_file.get(file, by_file.get(name))
            if entry is not None:
                out[name] = names_to_ids(entry, list(class_names), f"{p}: entry {file!r}")
        return out
    id_map = coco_stuff_182_to_171() if preset == "cocostuff" else None
    lines = read_tag_lines(p, id_map)
    # official ids are file stems (the image's name without '.jpg')
    return {n: lines[n] for n in names if n in lines} | {n: lines[Path(n).name] for n in names
                                                           if n not in lines and Path(n).name in lines}


def item_source(items, i: int) -> dict:
    """Item ``i``'s input as it is now (its image file's size and time, for ``--resume``)."""
    from tag2mask.io.uri_inputs import input_state

    return {"image": input_state(items[i].image_path)}
