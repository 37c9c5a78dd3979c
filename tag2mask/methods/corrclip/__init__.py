"""CorrCLIP (ICCV 2025): CLIP + DINO + class-agnostic regions, training-free.

Paper -> files:
- region-scoped, DINO-guided correlation in CLIP's last block (one window's features): :mod:`.model`.
- class-agnostic regions (pre-generated maps, SAM, superpixels), merging, scope and map correction:
  :mod:`.regions`; the DINO ViT: :mod:`tag2mask.models.dino`.
- the official ``"; "`` name-set files: :mod:`.names`; the pipeline and the registry's predictor
  factory: :mod:`.segmenter` (:class:`CorrClipSegmenter`, ``corrclip_predictor``); ``segment --method
  corrclip`` options: :mod:`.segment_cli` (defined in :mod:`.options`, shared with ``serve`` / ``demo``:
  :mod:`.app`). Presets live with SC-CLIP's and PEARL's in
  :mod:`tag2mask.methods.ovss2.presets`. Docs: docs/open_vocabulary.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CorrClipSegmenter", "read_corrclip_names"]

# imported on first use: the ``segment`` options (:mod:`.segment_cli`) are read by ``--help``, without torch
_LAZY = {"CorrClipSegmenter": "segmenter", "read_corrclip_names": "names"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
