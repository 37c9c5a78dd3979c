"""Newer training-free open-vocabulary segmenters: SC-CLIP and PEARL (CLIP only).

Each reuses the shared pipeline of :mod:`tag2mask.methods.ovss` and adds its own dense forward
(:mod:`.scclip`, :mod:`.pearl`); :mod:`.presets` pins the official per-dataset settings. Proven
against golden outputs of the official code (``tests/data/ovss2``).
"""

from tag2mask.methods.ovss2.presets import DATASET_SETTINGS, METHODS, Ovss2Preset, get_preset
from tag2mask.methods.ovss2.segmenter import NewerOvssSegmenter

__all__ = ["DATASET_SETTINGS", "METHODS", "Ovss2Preset", "get_preset", "NewerOvssSegmenter"]
