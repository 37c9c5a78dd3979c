"""CorrCLIP (ICCV 2025): CLIP + DINO + class-agnostic regions, training-free.

:mod:`.model` (one window's features), :mod:`.regions` (region sources, merging, scope, map
correction), :mod:`.names` (the official ``"; "`` name-set files), :mod:`.segmenter`
(:class:`CorrClipSegmenter`). Presets live with SC-CLIP's and PEARL's in
:mod:`tag2mask.methods.ovss2.presets`.
"""

from tag2mask.methods.corrclip.names import read_corrclip_names
from tag2mask.methods.corrclip.segmenter import CorrClipSegmenter

__all__ = ["CorrClipSegmenter", "read_corrclip_names"]
