"""TagCLIP (Lin et al., AAAI 2024): training-free multi-label tags from a frozen CLIP, then CLIP-ES masks.

Paper -> files (paper / spec section -> file of this package; spec = the implementation-grade
description of the official code ``linyq2117/TagCLIP`` @ ``c32b640f``; docs/tagclip.md for users):

======================================================  ==========================================
what                                                    where
======================================================  ==========================================
per-dataset settings (spec 3), official bugs (spec 9)   :mod:`.presets` (``PRESETS``, ``Quirks``)
the fork's two encoder regimes (spec 2.2-2.4, 4.2, 4.7) :mod:`.encoder`
coarse scores, attention vote ("dual masking" 1),       :mod:`.local`
class box masks ("dual masking" 2), refined scores
(spec 4.3-4.6)
class-wise re-identification, fusion, tags (4.7-4.8)    :mod:`.cwr`
the tagger API (spec 4, whole)                          :mod:`.tagger` (``TagCLIP``, ``TagResult``)
official mAP / F1 and the corrected mAP (spec 4.9)      :mod:`.metrics`
tag files (official ``<id> c1 c2`` lines, JSON)         :mod:`.tagfile`
the tag job's parts (tagger of --weights, per-image     :mod:`.job`
work, run-level files, ground truth for the metrics)
classify-then-segment: CLIP-ES on predicted tags with   :mod:`.segment`
the vendored CLIP-ES's differences (spec 6)
``tag2mask tag`` (spec 1 step 1, 4.9)                   :mod:`.cli` (registry: ``Command("", "tag")``)
``tag2mask label --method tagclip`` (spec 1, 6)         :mod:`.label_cli` (registry: ``Command("label",
                                                        "tagclip")``, runs :mod:`.segment` then CLIP-ES's
                                                        ``label`` job)
======================================================  ==========================================

CLIP-ES's parts (GradCAM, attention affinity, boxes, CRF) are reused from
:mod:`tag2mask.methods.clip_es` (its ``label`` job: :mod:`tag2mask.methods.clip_es.label_job`) and
:mod:`tag2mask.localization`.
"""

from typing import Any

__all__ = ["TagCLIP", "TagResult", "TagCLIPConfig", "Quirks", "OFFICIAL_QUIRKS", "PRESETS", "preset_for"]

_WHERE = {"TagCLIP": "tagger", "TagResult": "tagger", "TagCLIPConfig": "presets", "Quirks": "presets",
          "OFFICIAL_QUIRKS": "presets", "PRESETS": "presets", "preset_for": "presets"}


def __getattr__(name: str) -> Any:
    # lazy: `tag2mask --help` imports the sub-command module (cli.py) without torch or NumPy
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"tag2mask.methods.tagclip.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'tag2mask.methods.tagclip' has no attribute {name!r}")
