"""Procedural synthetic world for training/evaluating tiny CLIPs without downloads.

Object classes (shape + colour + pattern) on stuff textures, with exact VOC-style masks, image-level
labels and captions. Main entry points: :func:`generate_scene`, :class:`SyntheticDataset`,
:func:`generate_split`, :func:`export_voc`.
"""

from tag2mask.synth.export import export_voc, save_palette_png, voc_palette
from tag2mask.synth.scenes import VOID_LABEL, ObjectInstance, SceneSample, generate_scene
from tag2mask.synth.splits import SPLIT_OFFSETS, SyntheticDataset, generate_split, seed_for
from tag2mask.synth.world import (
    CLASS_NAMES,
    NUM_OBJECT_CLASSES,
    OBJECT_CLASSES,
    OBJECT_NAMES,
    STUFF_CLASSES,
    STUFF_NAMES,
    ObjectClass,
    StuffClass,
    object_class,
)

__all__ = [
    "CLASS_NAMES", "NUM_OBJECT_CLASSES", "OBJECT_CLASSES", "OBJECT_NAMES", "STUFF_CLASSES", "STUFF_NAMES",
    "ObjectClass", "StuffClass", "object_class",
    "VOID_LABEL", "ObjectInstance", "SceneSample", "generate_scene",
    "SPLIT_OFFSETS", "SyntheticDataset", "generate_split", "seed_for",
    "export_voc", "save_palette_png", "voc_palette",
]
