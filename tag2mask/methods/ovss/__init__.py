"""Training-free open-vocabulary segmentation: MaskCLIP, SCLIP, ClearCLIP and NACLIP.

The methods differ only in how the last block of CLIP's ViT is run (:mod:`.last_block`) and in
MaskCLIP's optional refinements (:mod:`.maskclip_refine`); :class:`OpenVocabSegmenter` is the
shared pipeline (resize, whole/sliding inference, text matching, background handling, PAMR).
"""

from tag2mask.methods.ovss.last_block import LAST_BLOCKS, get_last_block
from tag2mask.methods.ovss.maskclip_refine import key_smooth, prompt_denoise
from tag2mask.methods.ovss.segmenter import METHODS, PUBLISHED_SETTINGS, OpenVocabSegmenter, SegmentationResult

__all__ = [
    "LAST_BLOCKS", "get_last_block", "key_smooth", "prompt_denoise", "METHODS", "PUBLISHED_SETTINGS",
    "OpenVocabSegmenter", "SegmentationResult",
]
