"""TagCLIP settings: per-dataset presets and the official code's quirks behind one switch.

Spec sections 3 (vocabularies and constants) and 4 (the quirks), fixtures README section 4.

Two kinds of difference from a clean implementation are kept apart:

* **numerics** the official tagger runs with (always on, they are how the method is defined): float32
  weights even when a checkpoint would be rounded by CLIP-ES's loader, the interpolated positional
  table rounded to float16 except for an input of exactly the pretraining size;
* **bugs** of the official code (:class:`Quirks`), off by default and switched on by ``compat``:
  the clipped exclusive end of every box (a box touching the right/bottom border loses its last
  column/row; a CWR mask in the last column gives an empty box) and the early exit of class-wise
  re-identification on such an empty box (every later candidate keeps its local score).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from tag2mask.vocab import classes as _classes
from tag2mask.vocab.zero_shot_splits import COCO_STUFF_171
from tag2mask.vocab.templates import MASKCLIP_85, PHOTO

__all__ = ["Quirks", "OFFICIAL_QUIRKS", "TagCLIPConfig", "PRESETS", "PRESET_NAMES", "preset_for", "config_for_classes", "COCO_STUFF_CLASSES",
           "COCO_STUFF_UNUSED_IDS", "coco_stuff_182_to_171"]

#: COCO-Stuff's 171 used classes in label order as TagCLIP's ``clip_text.py`` dictionary spells them (without
#: ``unlabeled`` and the 11 unused ids): the shared list with two names written without their space
COCO_STUFF_CLASSES: tuple[str, ...] = tuple(
    {"potted plant": "pottedplant", "dining table": "diningtable"}.get(name, name) for name in COCO_STUFF_171
)

#: 0-based ids of the 182-entry COCO-Stuff space (label - 1) that no annotation uses.
COCO_STUFF_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def coco_stuff_182_to_171() -> dict[int, int]:
    """0-based 182-space id -> position in :data:`COCO_STUFF_CLASSES` (split-file ids of the official metrics)."""
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
    return {i: k for k, i in enumerate(used)}


@dataclass(frozen=True)
class Quirks:
    """Bugs of the official code, reproduced only when switched on (``compat``).

    Attributes:
        box_edge_quirk: box ends ``min(x + bw, w - 1)`` / ``min(y + bh, h - 1)`` used as exclusive ends,
            in the class masks and in the CWR crop box (spec 4.6, 4.7 step 2). Off: ``x + bw``, ``y + bh``.
        cwr_early_exit: an empty CWR crop box ends re-identification for the whole image (spec 4.7
            step 3). Off: that candidate alone keeps its local score and the loop goes on.
    """

    box_edge_quirk: bool = False
    cwr_early_exit: bool = False


#: What the official code does (the golden fixtures).
OFFICIAL_QUIRKS = Quirks(box_edge_quirk=True, cwr_early_exit=True)


@dataclass(frozen=True)
class TagCLIPConfig:
    """Settings of the TagCLIP tagger (spec section 3; fixtures ``settings.modes.<mode>``).

    Attributes:
        class_names: the K dataset classes (plain names, put into every template).
        background: background words: extra softmax competitors, never tags.
        templates: prompt templates averaged per text (official: the 85 ImageNet + scene templates).
        theta: relative threshold θ of the CWR candidates and of the final tags (0.5; COCO-Stuff 0.1).
        attn_mean_layers: 0-based blocks whose attention maps are averaged into W (official 8..10;
            COCO-Stuff 0..10).
        attn_vote_min_count: an entry is kept when at least this many of the 12 maps exceed their mean.
        last_block_mask: additive off-diagonal mask of the last block in the full-image pass (-100).
        crop_cls_mask_value: additive mask on the CLS query for masked-out crop patches (-1000).
        cwr_fuse_weight: weight of the crop's global probability in the fused score (0.5).
        cwr: run class-wise re-identification (off = the local scores are the final scores).
        round_pos_embed_fp16: round the interpolated positional table to fp16 (official; never at the
            pretraining size, where the stored table is used as is).
        quirks: official bugs (:class:`Quirks`), see the module docstring.
    """

    class_names: tuple[str, ...]
    background: tuple[str, ...] = ()
    templates: tuple[str, ...] = MASKCLIP_85
    theta: float = 0.5
    attn_mean_layers: tuple[int, ...] = (8, 9, 10)
    attn_vote_min_count: int = 4
    last_block_mask: float = -100.0
    crop_cls_mask_value: float = -1000.0
    cwr_fuse_weight: float = 0.5
    cwr: bool = True
    round_pos_embed_fp16: bool = True
    quirks: Quirks = field(default_factory=Quirks)

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ValueError("TagCLIP needs at least one class")
        if not 0.0 <= self.theta < 1.0:
            raise ValueError(f"theta must be in [0, 1), got {self.theta}")
        if not self.attn_mean_layers:
            raise ValueError("attn_mean_layers must name at least one block")
        if not 0.0 <= self.cwr_fuse_weight <= 1.0:
            raise ValueError(f"cwr_fuse_weight must be in [0, 1], got {self.cwr_fuse_weight}")

    @property
    def num_classes(self) -> int:
        """K: the classes that can become tags (the first K texts)."""
        return len(self.class_names)

    @property
    def texts(self) -> tuple[str, ...]:
        """The C = K + len(background) texts of every softmax, classes first."""
        return tuple(self.class_names) + tuple(self.background)

    def with_compat(self, compat: bool) -> "TagCLIPConfig":
        """This config with the official bugs on (``True``) or off."""
        return replace(self, quirks=OFFICIAL_QUIRKS if compat else Quirks())

    def to_dict(self) -> dict:
        """JSON-friendly dict for run records (templates counted, not listed)."""
        d = asdict(self)
        d["templates"] = f"{len(self.templates)} templates"
        d["class_names"] = f"{len(self.class_names)} classes"
        d["background"] = list(self.background)
        return d


_VOC = TagCLIPConfig(class_names=_classes.VOC_CLASSES, background=_classes.VOC_BACKGROUND_WORDS)

#: Per-dataset presets of ``classify.py`` (``voc`` = ``voc2007``/``voc2012``, ``coco`` = ``coco2014``/
#: ``coco2017``), plus ``synth`` for the shipped tiny CLIP's world (its training template, VOC constants).
PRESETS: dict[str, TagCLIPConfig] = {
    "voc": _VOC,
    "coco": TagCLIPConfig(class_names=_classes.COCO_CLASSES, background=_classes.COCO_BACKGROUND_WORDS),
    "cocostuff": TagCLIPConfig(class_names=COCO_STUFF_CLASSES, background=(), theta=0.1,
                               attn_mean_layers=tuple(range(11))),
}


#: every preset name (``--classes`` of ``tag`` / ``label --method tagclip``; the registry lists them)
PRESET_NAMES: tuple[str, ...] = (*PRESETS, "synth")


def _synth() -> TagCLIPConfig:
    from tag2mask.synth.world import OBJECT_NAMES, STUFF_NAMES

    return replace(_VOC, class_names=tuple(OBJECT_NAMES), background=tuple(STUFF_NAMES), templates=PHOTO)


def preset_for(name: str, compat: Optional[bool] = None, **overrides) -> TagCLIPConfig:
    """A preset (``voc``, ``coco``, ``cocostuff``, ``synth``) with fields overridden.

    ``compat=True`` switches the official bugs on (:data:`OFFICIAL_QUIRKS`), ``False`` off, ``None``
    keeps the preset's (off).
    """
    key = name.strip().lower()
    if key == "synth":
        config = _synth()
    elif key in PRESETS:
        config = PRESETS[key]
    else:
        raise ValueError(f"unknown TagCLIP preset {name!r}; choose from {sorted([*PRESETS, 'synth'])}")
    config = replace(config, **overrides) if overrides else config
    return config if compat is None else config.with_compat(compat)


def config_for_classes(spec: str, compat: bool = False) -> tuple[str, TagCLIPConfig]:
    """``--classes`` of the commands -> (preset name, config).

    A preset name (``voc``, ``coco``, ``cocostuff``, ``synth``) selects its whole setting; a name-set
    file or an inline list (:func:`tag2mask.vocab.vocabulary.load_vocabulary`) supplies the class
    names (display names) and background words, with the ``voc`` constants (θ 0.5, blocks 9-11).
    """
    key = spec.strip().lower()
    if key in PRESETS or key == "synth":
        return key, preset_for(key, compat=compat)
    from tag2mask.vocab.vocabulary import load_vocabulary

    vocab = load_vocabulary(spec)
    return "voc", preset_for("voc", compat=compat, class_names=tuple(vocab.names), background=tuple(vocab.background))
