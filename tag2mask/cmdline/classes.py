"""``--classes`` as label names: the class lists of ``eval``, ``train segmenter`` and ``train clip-zss``."""

from __future__ import annotations

from pathlib import Path

from tag2mask.vocab import classes as _vocab_classes

__all__ = ["VOC_CLASSES", "COCO_CLASSES", "resolve_classes", "zero_shot_split"]

VOC_CLASSES = list(_vocab_classes.VOC_CLASSES)
# CLIP-ES's class_names_coco order and spellings (motorbike, aeroplane, sofa, pottedplant, diningtable,
# tvmonitor), the names `tag2mask label --classes coco` uses: label k + 1 = COCO_CLASSES[k]
COCO_CLASSES = list(_vocab_classes.COCO_CLASSES)


def resolve_classes(spec: str, num_classes: int | None = None) -> list[str]:
    """Class names *including background at index 0* for ``voc``, ``coco``, ``synth``, a FILE or an inline list
    (a zero-shot split name gives its own label order, without a background entry for COCO-Stuff).

    FILE: one class per line; only the first comma-separated name of a line is used (the
    rest are synonyms); blank lines and ``#`` comments skipped. Background is prepended
    unless the first name is ``background``. An inline list is read as everywhere else
    (``"cat, dog|puppy; background: sky"``: display names, background words dropped).
    ``num_classes`` overrides the count: extra classes are named ``class <k>``; fewer than
    listed is an error.
    """
    path = Path(spec)
    split = zero_shot_split(spec)
    if split is not None:  # a zero-shot split's label order (COCO-Stuff: no background entry)
        names = list(split.class_names)
    elif spec.lower() == "voc":
        names = ["background"] + VOC_CLASSES
    elif spec.lower() == "coco":
        names = ["background"] + COCO_CLASSES
    elif spec.lower() == "synth":
        from tag2mask.synth.world import OBJECT_NAMES

        names = ["background"] + list(OBJECT_NAMES)
    elif not path.is_file() and ("," in spec or ";" in spec):
        from tag2mask.vocab.vocabulary import parse_class_string

        names = ["background"] + list(parse_class_string(spec).names)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"--classes: expected voc, coco, synth, a class file or an inline list "
                                    f"'cat, dog'; {spec} not found")
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
    from tag2mask.vocab.vocabulary import check_class_names

    return list(check_class_names(names, "--classes" if not path.is_file() else str(path)))


def zero_shot_split(spec: str):
    """The named zero-shot split ``spec`` (``voc-15-5``, ``synth-9-3`` ...), or ``None``."""
    from tag2mask.vocab.zero_shot_splits import find_split

    return find_split(spec) if "-" in spec and not Path(spec).exists() else None
