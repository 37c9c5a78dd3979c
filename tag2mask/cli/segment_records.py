"""``tag2mask segment``'s outputs: one image's files, and the per-image list in ``run.json`` rebuilt from the
merged manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["image_records", "write_outputs"]

#: output folder -> the kind name used in run.json's per-image "outputs"
_OUTPUT_KINDS = {"masks": "mask", "overlays": "overlay", "logits": "logits"}


def image_records(out: Path, files: list[Path], stems: dict[Path, str]) -> list[dict]:
    """run.json's per-image list (input order), rebuilt from the merged manifest."""
    from tag2mask.io.manifest import MANIFEST_NAME, latest_records
    from tag2mask.io.paths import path_inside

    records = latest_records([out / MANIFEST_NAME])
    images = []
    for f in files:
        rec = records.get(stems[f])
        if rec is None:  # not reached (--limit) or not in this run
            continue
        entry: dict = {"input": str(f), "status": rec.get("status")}
        if rec.get("status") == "ok":
            outputs = {}
            for rel in rec.get("outputs", []):
                p = path_inside(out, rel, out / MANIFEST_NAME)
                outputs[_OUTPUT_KINDS.get(p.parent.name, p.parent.name)] = str(out / p.relative_to(out.resolve()))
            entry.update(outputs=outputs, present=rec.get("present"), seconds=rec.get("seconds"))
        else:
            entry.update(error=rec.get("error"), error_kind=rec.get("error_kind"))
        images.append(entry)
    return images


def write_outputs(out: Path, stem: str, rgb, res, args: argparse.Namespace, original=None) -> dict[str, str]:
    """Mask PNG (+ overlay PNG, + logits npz) for one result; returns the written paths by kind.

    ``rgb`` is the image the mask aligns with; ``None`` means "decode ``original`` again" (a downscaled
    image's overlay is drawn on the full-size photo, read only when an overlay is asked for).
    """
    import numpy as np

    from tag2mask.io.atomic import atomic_path
    from tag2mask.io.palette import save_label_png

    written = {"mask": str(out / "masks" / f"{stem}.png")}
    save_label_png(written["mask"], res.label)
    if args.overlay:
        from tag2mask.io.visualize import save_overlay

        # the overlay helper leaves label 0 as the photo and names label k by names[k - 1]; shift
        # background-free maps by one so their first class is drawn too
        if res.has_background:
            label, names = res.label, list(res.class_names[1:])
        else:
            label, names = res.label.astype(np.uint16) + 1, list(res.class_names)
        if rgb is None:
            from tag2mask.data.images import load_image_array

            rgb = load_image_array(original, max_pixels=None)
        written["overlay"] = str(out / "overlays" / f"{stem}.png")
        save_overlay(written["overlay"], rgb, label.astype(np.uint8), names)
    if args.save_logits:
        written["logits"] = str(out / "logits" / f"{stem}.npz")
        with atomic_path(written["logits"]) as tmp:
            with open(tmp, "wb") as f:
                extra = {} if res.probs is None else {"probs": res.probs}
                np.savez_compressed(f, logits=res.logits, class_names=np.array(res.class_names), **extra)
    return written
