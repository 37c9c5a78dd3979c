"""``tag2mask segment``'s per-image list in ``run.json``, rebuilt from the merged manifest."""

from __future__ import annotations

from pathlib import Path

__all__ = ["image_records"]

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
