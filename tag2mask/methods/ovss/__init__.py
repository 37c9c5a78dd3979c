"""Training-free open-vocabulary segmentation: MaskCLIP, SCLIP, ClearCLIP and NACLIP.

The methods differ only in how the last block of CLIP's ViT is run (:mod:`.last_block`) and in
MaskCLIP's optional refinements (:mod:`.maskclip_refine`); :class:`OpenVocabSegmenter` is the
shared pipeline (resize, whole/sliding inference, text matching, background handling, PAMR), and
:mod:`.presets` holds its settings: ``default`` and ``published`` (the official harness of each
method, proven against golden data from the official code).
"""

from tag2mask.methods.ovss.last_block import LAST_BLOCKS, attention_weights, get_last_block
from tag2mask.methods.ovss.maskclip_refine import key_smooth, prompt_denoise
from tag2mask.methods.ovss.presets import DATASETS, PRESET_NAMES, OvssPreset, get_preset
from tag2mask.methods.ovss.segmenter import METHODS, PUBLISHED_SETTINGS, OpenVocabSegmenter, SegmentationResult

__all__ = [
    "LAST_BLOCKS", "attention_weights", "get_last_block", "key_smooth", "prompt_denoise", "DATASETS",
    "PRESET_NAMES", "OvssPreset", "get_preset", "METHODS", "PUBLISHED_SETTINGS", "OpenVocabSegmenter",
    "SegmentationResult",
]
