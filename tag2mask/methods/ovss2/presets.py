"""Settings presets of SC-CLIP, PEARL and CorrCLIP: ``default``, ``published`` and ``published:<dataset>``.

Same scheme as :mod:`tag2mask.methods.ovss.presets` (which holds MaskCLIP, SCLIP, ClearCLIP and
NACLIP): a preset is one :class:`Ovss2Preset` that the segmenter applies itself; a caller names it
and may override single fields. ``published`` is the official harness of each method (golden
fixtures in ``tests/data/ovss2``); ``published:<dataset>`` adds what the official config of that
benchmark changes (:data:`DATASET_SETTINGS`). ``default`` keeps this package's usual choices:
short side 448, full-precision weights.

======== ====================== ===== ============ ===== =================================================
method   official code           short crop/stride  logit other
                                 side               scale
======== ====================== ===== ============ ===== =================================================
scclip   SuleBai/SC-CLIP         336   224 / 112    40    LOF anomaly smoothing, no PAMR
pearl    PGSmall/PEARL           336   224 / 112    40    alpha_kk 0.08, polar 5 its, TLP grid 80, probs
                                                          renormalised
corrclip zdk258/CorrCLIP (v1)    336   336 / 112    40    DINO ViT-B/8, region maps, MetaCLIP B/16 weights,
                                                          windows padded to a multiple of 56
======== ====================== ===== ============ ===== =================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from tag2mask.methods.ovss.presets import PRESET_NAMES, OvssPreset, lookup_preset
from tag2mask.methods.ovss2.scclip import TOKEN_MAPS

__all__ = ["METHODS", "Ovss2Preset", "DATASET_SETTINGS", "get_preset", "published_settings", "preset_settings"]

METHODS = ("scclip", "pearl", "corrclip")


@dataclass(frozen=True)
class Ovss2Preset(OvssPreset):
    """:class:`~tag2mask.methods.ovss.presets.OvssPreset` plus the settings of the newer methods.

    Attributes (besides the inherited ones; ``last_block`` names the method's own forward):
        scclip_token_map: SC-CLIP's token index -> grid cell mapping for the anomaly smoothing:
            ``correct`` (default) or ``official`` (the released code's, wrong for non-square windows).
        alpha_kk: PEARL's weight of the centred key-key term in its attention.
        polar_iters: PEARL's Newton-Schulz iterations for the Procrustes rotation.
        tlp: run PEARL's text-aware Laplacian propagation on the full-resolution logits.
        tlp_grid: TLP's target grid: logits are average-pooled by ``round(size / tlp_grid)``.
    """

    scclip_token_map: str = "correct"
    alpha_kk: float = 0.08
    polar_iters: int = 5
    tlp: bool = True
    tlp_grid: int = 80

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scclip_token_map not in TOKEN_MAPS:
            raise ValueError(f"unknown scclip_token_map {self.scclip_token_map!r}; choose one of {list(TOKEN_MAPS)}")
        if self.alpha_kk < 0:
            raise ValueError(f"alpha_kk must be >= 0, got {self.alpha_kk}")
        if self.polar_iters < 1:
            raise ValueError(f"polar_iters must be >= 1, got {self.polar_iters}")
        if self.tlp_grid < 1:
            raise ValueError(f"tlp_grid must be >= 1, got {self.tlp_grid}")


def _default(method: str) -> Ovss2Preset:
    # SC-CLIP is SCLIP's harness (whole images upsampled directly); PEARL is NACLIP's (renormalised probs)
    preset = Ovss2Preset(name="default", method=method, last_block=method,
                         whole_upsample="direct" if method == "scclip" else "input",
                         renormalise_probs=method == "pearl")
    # CorrCLIP's windows are part of the method (336 px, stride 112) in every preset
    return dataclasses.replace(preset, crop=336, stride=112) if method == "corrclip" else preset


def _published(method: str) -> Ovss2Preset:
    return dataclasses.replace(_default(method), name="published", round_fp16_weights=True, short_side=336,
                               pamr_guide="input")


_PRESETS = {(m, name): (_default if name == "default" else _published)(m) for m in METHODS for name in PRESET_NAMES}

#: what the official configs change per benchmark (``published:<dataset>``)
DATASET_SETTINGS: dict[str, dict[str, dict[str, object]]] = {
    "scclip": {
        "voc21": {"area_threshold": 0.1, "logit_scale": 50.0, "prob_threshold": 0.15},
        "context60": {"prob_threshold": 0.15},
        "coco_object": {"logit_scale": 55.0, "prob_threshold": 0.35},
        "city_scapes": {"short_side": 560},
    },
    "pearl": {
        "voc21": {"prob_threshold": 0.1, "mode": "whole"},
        "voc20": {"mode": "whole"},
        "context60": {"prob_threshold": 0.1},
        "coco_object": {"prob_threshold": 0.1},
        "ade20k": {"alpha_kk": 0.3},
        "city_scapes": {"short_side": 560, "alpha_kk": 0.3, "tlp_grid": 224},
    },
    "corrclip": {
        "voc21": {"prob_threshold": 0.2},
        "context60": {"prob_threshold": 0.15},
        "coco_object": {"prob_threshold": 0.25},
        "ade20k": {"short_side": 448},
        "city_scapes": {"short_side": 448, "crop": 224},
    },
}


def get_preset(method: str, name: Union[str, OvssPreset] = "default") -> Ovss2Preset:
    """The preset ``name`` (``default``, ``published``, ``published:<dataset>``) of ``method``.

    An :class:`Ovss2Preset` is returned as is after a method check.
    """
    method = method.strip().lower()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if isinstance(name, OvssPreset):
        if name.method != method or not isinstance(name, Ovss2Preset):
            raise ValueError(f"preset {name.name!r} is not an Ovss2Preset of method {method!r}")
        return name
    return lookup_preset(_PRESETS, DATASET_SETTINGS, method, name)


def published_settings() -> dict[str, dict[str, object]]:
    """method -> the fields of its ``published`` preset (docs, ``--help``)."""
    return {m: get_preset(m, "published").to_dict() for m in METHODS}


def preset_settings(method: str, name: str) -> dict[str, object]:
    """Every setting of ``method``'s preset ``name`` as plain data (the registry's ``preset_settings``)."""
    return get_preset(method, name).to_dict()
