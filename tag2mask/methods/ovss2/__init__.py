"""Newer training-free open-vocabulary segmenters: SC-CLIP (IEEE TIP 2025) and PEARL (CVPR 2026), CLIP only.

Each reuses the shared pipeline of :mod:`tag2mask.methods.ovss` and adds its own dense forward.
Paper -> files:
- SC-CLIP (LOF anomaly detection and smoothing, multi-level feature fusion, self-adjusting last block):
  :mod:`.scclip`.
- PEARL (Procrustes-aligned last-block attention with a key-key term; text-aware Laplacian propagation
  of the logits): :mod:`.pearl`.
- The pipeline around them: :mod:`.segmenter` (:class:`NewerOvssSegmenter`); settings ``default`` /
  ``published`` / ``published:<dataset>`` of SC-CLIP, PEARL and CorrCLIP: :mod:`.presets`; the
  ``segment --method scclip|pearl`` options: :mod:`.segment_cli`; SC-CLIP and PEARL in ``tag2mask demo``: :mod:`.demo`.
Proven against golden outputs of the official code (``tests/data/ovss2``). Docs: docs/open_vocabulary.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DATASET_SETTINGS", "METHODS", "Ovss2Preset", "get_preset", "NewerOvssSegmenter"]

# imported on first use: the ``segment`` options (:mod:`.segment_cli`) are read by ``--help``, without torch
_LAZY = {"NewerOvssSegmenter": "segmenter", **{n: "presets" for n in __all__ if n != "NewerOvssSegmenter"}}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
