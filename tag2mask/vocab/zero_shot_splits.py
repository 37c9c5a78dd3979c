"""Named seen / unseen splits of inductive generalised zero-shot segmentation (CLIP-ZSS's benchmarks).

A split fixes a data set's label order (``class_names``: label value ``k`` is ``class_names[k]``),
which classes are unseen in training, and how label 0 is treated:

* ``background="ignore"``: label 0 is background and is *not* a class of the protocol (VOC-20 and
  Context-59 as ZegCLIP evaluates them, ``reduce_zero_label``): ignored in training and scoring;
* ``background="class"``: label 0 is background and a seen class (the synthetic world);
* ``background="none"``: there is no background label (COCO-Stuff 164k: labels 0..170).

Sources (see ``docs/clip_zss.md``): the VOC and COCO-Stuff lists are ZegCLIP's ``base_class`` /
``novel_class`` configs (``configs/voc12/vpt_seg_zero_*.py``, ``configs/coco/vpt_seg_zero_*.py``),
which CLIP-ZSS compares against; the Context-59 list is the ten unseen classes of MaskCLIP+'s
Context zero-shot config (cow, motorbike, sofa, cat, boat, fence, bird, tv monitor, keyboard,
aeroplane). That CLIP-ZSS used exactly these lists is an assumption (the paper text was not
available); the class names are mmsegmentation's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tag2mask.synth.world import OBJECT_NAMES
from tag2mask.vocab.classes import VOC_CLASSES

__all__ = ["SeenUnseenNames", "ZeroShotSplit", "SPLITS", "get_split", "split_names", "COCO_STUFF_171", "PASCAL_CONTEXT_59"]

#: COCO-Stuff 164k, label order of its ``*_labelTrainIds.png`` (0..170; 255 = ignore)
COCO_STUFF_171: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other",
    "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes",
    "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)

#: PASCAL Context 59 (label 1..59 on disk, 0 = background, as mmsegmentation's PascalContextDataset59)
PASCAL_CONTEXT_59: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)

# ZegCLIP's novel_class indices into COCO_STUFF_171
_COCO_STUFF_UNSEEN_IDS = (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160)


class SeenUnseenNames:
    """The seen / unseen views of ``class_names`` (label value -> name; index 0 ``"background"`` unless
    ``background == "none"``) and ``unseen`` names, for the classes that hold those fields."""

    class_names: tuple[str, ...]
    unseen: tuple[str, ...]
    background: str

    @property
    def foreground(self) -> tuple[str, ...]:
        """The class names without the background entry."""
        return self.class_names if self.background == "none" else self.class_names[1:]

    @property
    def seen(self) -> tuple[str, ...]:
        """Foreground classes that have pixel labels in training (label order)."""
        return tuple(n for n in self.foreground if n not in self.unseen)


@dataclass(frozen=True)
class ZeroShotSplit(SeenUnseenNames):
    """A seen / unseen protocol on one data set's labels (see the module docstring).

    Attributes:
        name: the split's name (``--split``, ``tag2mask eval --unseen NAME``).
        class_names: label value ``k`` -> name; index 0 is ``"background"`` unless ``background == "none"``.
        unseen: names of the unseen classes (a subset of ``class_names``).
        background: ``ignore`` | ``class`` | ``none``.
        prompt_names: names put into the text prompts where they differ from ``class_names``
            (``{"pottedplant": "potted plant"}``); the others are used as they are.
        source: where the list comes from.
    """

    name: str
    class_names: tuple[str, ...]
    unseen: tuple[str, ...]
    background: str
    prompt_names: tuple[tuple[str, str], ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if self.background not in ("ignore", "class", "none"):
            raise ValueError(f"background must be ignore, class or none, got {self.background!r}")
        missing = [n for n in self.unseen if n not in self.class_names]
        if missing:
            raise ValueError(f"split {self.name}: unseen classes {missing} are not in its class list")
        if self.background != "none" and self.class_names[0] != "background":
            raise ValueError(f"split {self.name}: label 0 must be 'background' when background={self.background!r}")

    @property
    def unseen_ids(self) -> tuple[int, ...]:
        """Label values of the unseen classes."""
        return tuple(self.class_names.index(n) for n in self.unseen)

    def prompt(self, name: str) -> str:
        """The words a class name is embedded as."""
        return dict(self.prompt_names).get(name, name)


_VOC_PROMPTS = (("aeroplane", "aeroplane"), ("diningtable", "dining table"), ("pottedplant", "potted plant"),
                ("tvmonitor", "tv monitor"))
_CONTEXT_PROMPTS = (("pottedplant", "potted plant"), ("tvmonitor", "tv monitor"), ("bedclothes", "bedclothes"))

#: the named splits (``--split NAME``)
SPLITS: dict[str, ZeroShotSplit] = {s.name: s for s in (
    ZeroShotSplit("voc-15-5", ("background",) + VOC_CLASSES, ("pottedplant", "sheep", "sofa", "train", "tvmonitor"),
                  "ignore", _VOC_PROMPTS, "ZegCLIP configs/voc12 (novel_class 15..19 of VOC-20)"),
    ZeroShotSplit("coco-stuff-156-15", COCO_STUFF_171, tuple(COCO_STUFF_171[i] for i in _COCO_STUFF_UNSEEN_IDS),
                  "none", (), "ZegCLIP configs/coco (novel_class)"),
    ZeroShotSplit("context-49-10", ("background",) + PASCAL_CONTEXT_59,
                  ("cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor", "keyboard", "aeroplane"),
                  "ignore", _CONTEXT_PROMPTS, "MaskCLIP+ Context zero-shot config (assumed for CLIP-ZSS)"),
    # the synthetic world: 3 of its 12 object classes unseen (tag2mask's own benchmark)
    ZeroShotSplit("synth-9-3", ("background",) + OBJECT_NAMES, ("ring", "heart", "hexagon"), "class", (),
                  "tag2mask synthetic world"),
)}


def split_names() -> tuple[str, ...]:
    return tuple(SPLITS)


def get_split(name: str) -> ZeroShotSplit:
    """The split called ``name`` (``ValueError`` listing the known ones)."""
    key = name.strip().lower()
    if key not in SPLITS:
        raise ValueError(f"unknown zero-shot split {name!r}; choose from {', '.join(SPLITS)}")
    return SPLITS[key]


def find_split(name: str) -> Optional[ZeroShotSplit]:
    """The split called ``name``, or ``None``."""
    return SPLITS.get(name.strip().lower())
