"""The item reader of ``label``, ``label --method fma`` and ``prompts select``: images with image-level tags.

A data set is a VOC root (tags from ``Annotations/*.xml``), a COCO root (split files with class ids)
or an image folder with a JSON / CSV tag file (``--labels``); the folder may be a URI (``s3://bucket/prefix``,
``file:///...``; :class:`tag2mask.data.datasets.UriFolderDataset`). ``--classes`` names the vocabulary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tag2mask.cmdline.options import given

__all__ = ["open_items", "check_vocabulary", "item_keys", "describe", "source"]

#: VOC roots: how many annotations are read up front to tell a wrong --classes from a few bad files
_XML_SAMPLE = 64


def open_items(args: argparse.Namespace, class_names: list[str]):
    from tag2mask.data.datasets import COCODataset, FolderDataset, VOCDataset, detect_dataset, xml_object_names
    from tag2mask.data.tag_files import read_labels_file
    from tag2mask.io.uri_inputs import is_uri

    if is_uri(args.images):  # an object store's prefix: a folder of images with a local label file
        from tag2mask.data.datasets import UriFolderDataset

        if args.labels is None:
            raise ValueError(f"{args.images}: a URI input needs --labels (JSON or CSV; VOC and COCO roots are "
                             "read from local folders)")
        check_vocabulary(args, read_labels_file(args.labels), class_names, str(args.labels))
        return UriFolderDataset(args.images, args.labels, class_names, strict=False)
    kind = detect_dataset(args.images)
    if args.labels is None:
        if kind == "coco":
            split = args.split if args.split.endswith(".txt") else f"{args.split}.txt"
            return COCODataset(args.images, split, class_names)
        if kind != "voc":
            raise ValueError(f"{args.images}: not a VOC or COCO root, so --labels is required (JSON or CSV)")
        dataset = VOCDataset(args.images, split=args.split, class_names=class_names)
        tags = {}
        for name in dataset.names[:_XML_SAMPLE]:
            try:
                tags[name] = xml_object_names(dataset.root / "Annotations" / f"{name}.xml")
            except ValueError:
                continue  # a broken annotation is that item's error record
        sampled = f" (the first {len(tags)} of {len(dataset)})" if len(dataset) > _XML_SAMPLE else ""
        check_vocabulary(args, tags, class_names, f"{dataset.root / 'Annotations'}{sampled}")
        return dataset
    image_dir = Path(args.images)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    if kind in ("voc", "coco"):
        image_dir = image_dir / "JPEGImages" if (image_dir / "JPEGImages").is_dir() else image_dir / "VOC2012" / "JPEGImages"
    check_vocabulary(args, read_labels_file(args.labels), class_names, str(args.labels))
    return FolderDataset(image_dir, args.labels, class_names, strict=False)


def check_vocabulary(args: argparse.Namespace, tags: dict, class_names: list[str], source: str) -> None:
    """One error up front when the tags are not names of --classes (typically: --classes forgotten).

    With the default --classes any unknown name stops the run; with an explicit --classes only a
    file where every image has an unknown name does (a few bad entries become per-image errors).
    """
    from tag2mask.data.tag_files import unknown_class_names
    from tag2mask.synth.export import is_synthetic_export

    unknown = unknown_class_names(tags, class_names)
    bad_images = {image for images in unknown.values() for image in images}
    if not unknown or (given(args, "classes") and len(bad_images) < len(tags)):
        return
    names = sorted(unknown, key=lambda n: (-len(unknown[n]), n))
    shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    if is_synthetic_export(args.images):
        hint = "pass --classes synth (this is a tag2mask synth export)"
    else:
        hint = ("pass --classes with your class list: a name-set file (one class per line), an inline list "
                "'cat, dog, ...', or voc / coco / synth")
    which = f"--classes {args.classes}" + ("" if given(args, "classes") else " (the default)")
    raise ValueError(f"{source}: {len(bad_images)} of {len(tags)} images are tagged with class names that {which} "
                     f"does not know: {shown}; {hint}")


def item_keys(dataset) -> list[str]:
    """Item names without building samples (a VOC sample parses its XML; that may fail per item)."""
    return dataset.names


def describe(dataset, i: int) -> str:
    """The image file of item ``i`` for messages (its name if the sample cannot be built)."""
    try:
        return str(dataset[i].image_path)
    except Exception:
        return str(dataset.names[i])


def source(dataset, i: int) -> dict:
    """Item ``i``'s inputs as they are now: its image file's size and time, and its labels (for --resume)."""
    from tag2mask.io.uri_inputs import input_state

    sample = dataset[i]
    return {"image": input_state(sample.image_path), "labels": list(sample.label_ids)}


def run_item_job(args: argparse.Namespace, items, stages, out: Path, settings: dict, record: dict,
                 finalize, desc: str, engine=None) -> int:
    """Run a labelling job over ``items`` (an opened item reader) with the batch runner: resume, overwrite,
    per-item failures, the run record; prints the summary and returns the command's exit code.
    ``engine``: where the items run (:class:`tag2mask.jobs.ray_engine.RayEngine`; default this process)."""
    from tag2mask.jobs.runner import JobOptions, print_summary, process_exit_code, run_items

    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc=desc, unit="img")
    summary = run_items(items, stages, out, settings, options, keys=item_keys(items),
                        preflight_errors=getattr(items, "errors", []), describe=lambda i: describe(items, i),
                        run_record=record, finalize=finalize, source_of=lambda i: source(items, i), engine=engine)
    if not args.quiet or summary.failed:
        print_summary(summary, out, "label")
    return process_exit_code(summary)
