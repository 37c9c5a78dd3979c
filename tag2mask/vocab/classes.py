"""Class vocabularies as the official CLIP-ES / WeCLIP code spells them (``clip_text.py``).

The ``*_CLIP_ES_NAMES`` strings are what those methods actually put into the prompt: synonyms are
written into one sentence-level name (``'person with clothes,people,human'``), and CLIP-ES's
``'sknowboard'`` typo is kept on purpose so embeddings match the original code.  The background
words are extra softmax competitors, not classes that get a mask.
"""

from __future__ import annotations

# PASCAL VOC 2012, VOC index order (label 1..20; 0 is background).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# CLIP-ES ``new_class_names``.
VOC_CLIP_ES_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle",
    "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor screen",
)

# CLIP-ES ``BACKGROUND_CATEGORY`` (25 "class-related background" words).
VOC_BACKGROUND_WORDS: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river",
    "sea", "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean",
    "road", "rock", "street", "valley", "bridge", "sign",
)

# MaskCLIP's VOC names (spaced words, 'airplane', 'tv monitor').
MASKCLIP_VOC_NAMES: tuple[str, ...] = (
    "airplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person",
    "potted plant", "sheep", "sofa", "train", "tv monitor",
)

# COCO 2014 objects, CLIP-ES ``class_names_coco`` order (category ids sorted, VOC-style spellings).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorbike", "aeroplane",
    "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "sofa", "pottedplant", "bed",
    "diningtable", "toilet", "tvmonitor", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# CLIP-ES ``new_class_names_coco`` ('sknowboard' typo kept).
COCO_CLIP_ES_NAMES: tuple[str, ...] = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane",
    "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird avian",
    "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack,bag",
    "umbrella,parasol", "handbag,purse", "necktie", "suitcase", "frisbee",
    "skis", "sknowboard", "sports ball", "kite", "baseball bat",
    "glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "dessertspoon",
    "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair seat", "sofa", "pottedplant", "bed",
    "diningtable", "toilet", "tvmonitor screen", "laptop", "mouse",
    "remote control", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hairdrier,blowdrier", "toothbrush",
)

# CLIP-ES ``BACKGROUND_CATEGORY_COCO``: the VOC list without 'keyboard' (a COCO class) and 'sign'.
COCO_BACKGROUND_WORDS: tuple[str, ...] = tuple(w for w in VOC_BACKGROUND_WORDS if w not in ("keyboard", "sign"))

__all__ = [
    "VOC_CLASSES", "VOC_CLIP_ES_NAMES", "VOC_BACKGROUND_WORDS", "MASKCLIP_VOC_NAMES",
    "COCO_CLASSES", "COCO_CLIP_ES_NAMES", "COCO_BACKGROUND_WORDS",
]
