"""Settings presets of the training-free segmenters: ``default`` and ``published``.

A preset is one :class:`OvssPreset`; :class:`~tag2mask.methods.ovss.segmenter.OpenVocabSegmenter`
consumes it and applies every field itself (a caller only names the preset, and may override single
fields). ``published`` reproduces the official harness of each method as its repository ships it
(golden fixtures in ``tests/data/ovss``, see ``docs/open_vocabulary.md``):

========== ===================== ========= ============ ====== ===== ==========================
method     official code          short     crop/stride  logit  PAMR  other
                                  side                   scale
========== ===================== ========= ============ ====== ===== ==========================
sclip      wangf3014/SCLIP        336       224 / 112    40     off   whole mode: direct upsampling
naclip     sinahmr/NACLIP         336       224 / 112    40     on    probs renormalised; PAMR guide
                                                                      = the resized input
clearclip  mc-lan/ClearCLIP       448       448 / 224    50     off   windows zero-padded (centred)
                                                                      to a multiple of the patch
maskclip   chongzhou96/MaskCLIP   512       whole        1      off   mmseg ViT numerics, 85 templates
========== ===================== ========= ============ ====== ===== ==========================

All published presets of SCLIP, NACLIP and ClearCLIP use the harness numerics (OpenCV uint8 resize,
mean/std in 0-255 units, bicubic positional embedding with the ``(n + 0.1) / 14`` scale factors)
and fp16-rounded weights (their loaders convert the checkpoint to fp16 before copying it in).
``default`` shares the harness numerics and keeps four deliberate choices: short side 448 with
224 / 112 windows for every method, full-precision weights, PAMR off, and PAMR guided by the
original image. ``published:<dataset>`` adds what the official config of one benchmark changes
(``prob_thd``, ``area_thd`` and ``logit_scale`` on the background datasets, Cityscapes' short side,
NACLIP's whole-image VOC runs): :data:`DATASET_SETTINGS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from tag2mask.config import DictConfig

__all__ = [
    "lookup_preset", "OvssPreset", "PRESET_NAMES", "NUMERICS", "DATASETS", "DATASET_SETTINGS", "get_preset", "preset_settings", "published_settings",
]

PRESET_NAMES = ("default", "published")

#: ``harness``: the SCLIP / NACLIP / ClearCLIP pipelines; ``maskclip``: MaskCLIP's mmseg ViT;
#: ``model``: the loaded model as it is (CLIP mean/std, its own positional interpolation).
NUMERICS = ("harness", "maskclip", "model")


@dataclass(frozen=True)
class OvssPreset(DictConfig):
    """Every setting that changes a training-free segmenter's output.

    Attributes:
        name: preset name (``default``, ``published`` or ``custom`` after overrides).
        method: ``maskclip`` | ``sclip`` | ``clearclip`` | ``naclip`` | ``clip``.
        last_block: last-block variant (:data:`~tag2mask.methods.ovss.last_block.LAST_BLOCKS`).
        templates: prompt-template set name.
        numerics: image-side numerics, one of :data:`NUMERICS`.
        round_fp16_weights: run with the weights rounded to fp16 (as the official loaders do).
        short_side, max_long_side: keep-ratio resize (``short_side=None`` keeps the image size).
        mode: ``whole`` or ``slide``; crop, stride: sliding-window geometry in pixels.
        window_padding: ``none`` (the patch grid floors a window) or ``centre`` (zero-pad each
            window to a multiple of the patch size, floor/ceil split, and crop the logits back).
        whole_upsample: whole mode only: ``input`` (patch logits -> input size -> image size) or
            ``direct`` (patch logits -> image size in one bilinear step).
        logit_scale: softmax temperature over prompts (``None``: 1 with ``maskclip`` numerics).
        prob_threshold: pixels whose best class probability is below it become background.
        area_threshold: SCLIP's rule, classes with at most this fraction of the foreground
            argmax area are zeroed before the argmax (``None`` = off).
        pamr, pamr_steps, pamr_dilations: PAMR on the full-resolution prompt logits.
        pamr_guide: ``image`` (the original image) or ``input`` (the resized network input resized
            back to the image size, as the official code).
        renormalise_probs: divide the returned class probabilities by their per-pixel sum after
            the label is taken (NACLIP's ``seg_logits``).
        naclip_std: NACLIP's Gaussian σ in patches.
    """

    name: str
    method: str
    last_block: str
    templates: str = "imagenet80"
    numerics: str = "harness"
    round_fp16_weights: bool = False
    short_side: Optional[int] = 448
    max_long_side: int = 2048
    mode: str = "slide"
    crop: int = 224
    stride: int = 112
    window_padding: str = "none"
    whole_upsample: str = "input"
    logit_scale: Optional[float] = 40.0
    prob_threshold: float = 0.0
    area_threshold: Optional[float] = None
    pamr: bool = False
    pamr_steps: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    pamr_guide: str = "image"
    renormalise_probs: bool = False
    naclip_std: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pamr_dilations", tuple(int(d) for d in self.pamr_dilations))
        checks = (
            ("numerics", self.numerics, NUMERICS),
            ("mode", self.mode, ("whole", "slide")),
            ("window_padding", self.window_padding, ("none", "centre")),
            ("whole_upsample", self.whole_upsample, ("input", "direct")),
            ("pamr_guide", self.pamr_guide, ("image", "input")),
        )
        for field, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; choose one of {list(allowed)}")
        if not 0.0 <= self.prob_threshold <= 1.0:
            raise ValueError(f"prob_threshold must be in [0, 1], got {self.prob_threshold}")
        if self.area_threshold is not None and not 0.0 <= self.area_threshold < 1.0:
            raise ValueError(f"area_threshold must be in [0, 1), got {self.area_threshold}")
        if self.crop <= 0 or self.stride <= 0:
            raise ValueError(f"crop and stride must be positive, got {self.crop}, {self.stride}")
        if self.short_side is not None and self.short_side <= 0:
            raise ValueError(f"short_side must be positive or None, got {self.short_side}")
        if self.max_long_side <= 0:
            raise ValueError(f"max_long_side must be positive, got {self.max_long_side}")
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {self.logit_scale}")
        if self.pamr_steps < 0 or not self.pamr_dilations or min(self.pamr_dilations) < 1:
            raise ValueError(f"PAMR needs steps >= 0 and positive dilations, got {self.pamr_steps}, {self.pamr_dilations}")
        if self.naclip_std <= 0:
            raise ValueError(f"naclip_std must be > 0, got {self.naclip_std}")

    @property
    def effective_logit_scale(self) -> float:
        """The temperature actually used: ``logit_scale``, or 1 (raw cosines) for MaskCLIP numerics."""
        if self.logit_scale is not None:
            return float(self.logit_scale)
        return 1.0 if self.numerics == "maskclip" else (50.0 if self.method == "clearclip" else 40.0)

    def replace(self, **changes: object) -> "OvssPreset":
        """Copy with ``changes``; the name becomes ``custom`` when a value really changes."""
        if not changes:
            return self
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown preset fields {sorted(unknown)}")
        new = dataclasses.replace(self, **changes)
        if "name" not in changes and dataclasses.replace(new, name=self.name) != self:
            new = dataclasses.replace(new, name=f"{self.name}+custom")
        return new



def _default(method: str) -> OvssPreset:
    return OvssPreset(
        name="default",
        method=method,
        last_block=method,
        templates="maskclip85" if method == "maskclip" else "imagenet80",
        logit_scale=50.0 if method == "clearclip" else 40.0,
        window_padding="centre" if method == "clearclip" else "none",
        whole_upsample="direct" if method in ("sclip", "clearclip", "clip") else "input",
        renormalise_probs=method == "naclip",
    )


def _published(method: str) -> OvssPreset:
    base = dataclasses.replace(_default(method), name="published", round_fp16_weights=True, pamr_guide="input")
    if method in ("sclip", "clip"):
        return dataclasses.replace(base, short_side=336)
    if method == "naclip":
        return dataclasses.replace(base, short_side=336, pamr=True)
    if method == "clearclip":
        return dataclasses.replace(base, short_side=448, crop=448, stride=224)
    # MaskCLIP's own repository: mmseg ViT numerics, whole image at short side 512, raw cosine logits
    return dataclasses.replace(base, numerics="maskclip", round_fp16_weights=False, short_side=512, mode="whole",
                               logit_scale=None, whole_upsample="input")


_METHODS = ("maskclip", "sclip", "clearclip", "naclip", "clip")
_PRESETS: dict[tuple[str, str], OvssPreset] = {
    (m, name): (_default if name == "default" else _published)(m) for m in _METHODS for name in PRESET_NAMES
}

#: benchmark names of the official ``configs/cfg_<dataset>.py`` files
DATASETS = ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "city_scapes", "ade20k")

#: what the official configs change per benchmark on top of the method's constructor defaults
#: (``published:<dataset>`` applies them; datasets without an entry use ``published`` as is)
DATASET_SETTINGS: dict[str, dict[str, dict[str, object]]] = {
    "sclip": {
        "voc21": {"logit_scale": 65.0, "prob_threshold": 0.1, "area_threshold": 0.1},
        "context60": {"logit_scale": 50.0, "prob_threshold": 0.1},
        "coco_object": {"logit_scale": 50.0, "prob_threshold": 0.1},
        "coco_stuff": {"short_side": 448},
        "city_scapes": {"short_side": 560},
    },
    "naclip": {
        "voc21": {"prob_threshold": 0.1, "mode": "whole"},
        "voc20": {"mode": "whole"},
        "context60": {"prob_threshold": 0.1},
        "coco_object": {"prob_threshold": 0.1},
        "city_scapes": {"short_side": 560},
    },
    "clearclip": {
        "voc21": {"prob_threshold": 0.5},
        "context60": {"prob_threshold": 0.15},
        "coco_object": {"prob_threshold": 0.4},
        "city_scapes": {"crop": 224},
    },
    # MaskCLIP's configs: short side 512 (VOC-20, COCO-Stuff), long side 520 on Pascal Context
    "maskclip": {"context59": {"short_side": 520, "max_long_side": 520}},
}


def get_preset(method: str, name: Union[str, OvssPreset] = "default") -> OvssPreset:
    """The preset ``name`` of ``method``: ``default``, ``published`` or ``published:<dataset>``.

    ``published:<dataset>`` (``<dataset>`` one of :data:`DATASETS`) adds what the official config of
    that benchmark sets (:data:`DATASET_SETTINGS`). An :class:`OvssPreset` is returned as is after a
    method check.
    """
    method = method.strip().lower()
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(_METHODS)}")
    if isinstance(name, OvssPreset):
        if name.method != method:
            raise ValueError(f"preset {name.name!r} is for method {name.method!r}, not {method!r}")
        return name
    return lookup_preset(_PRESETS, DATASET_SETTINGS, method, name)


def lookup_preset(presets: dict, dataset_settings: dict, method: str, name: str) -> OvssPreset:
    """``default``, ``published`` or ``published:<dataset>`` of ``method`` from a method family's tables:
    ``presets`` maps ``(method, base name)`` to a preset, ``dataset_settings`` ``method -> dataset -> changes``
    (what the official config of that benchmark sets)."""
    key = str(name).strip().lower()
    base, _, dataset = key.partition(":")
    if base not in PRESET_NAMES or (dataset and base != "published"):
        raise ValueError(f"unknown preset {name!r}; choose default, published or published:<dataset>")
    preset = presets[(method, base)]
    if not dataset:
        return preset
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} in preset {name!r}; choose one of {list(DATASETS)}")
    return dataclasses.replace(preset, name=key, **dataset_settings.get(method, {}).get(dataset, {}))


def published_settings() -> dict[str, dict[str, object]]:
    """method -> the fields of its ``published`` preset (for docs and ``--help``)."""
    return {m: get_preset(m, "published").to_dict() for m in _METHODS}


def preset_settings(method: str, name: str) -> dict[str, object]:
    """Every setting of ``method``'s preset ``name`` as plain data (the registry's ``preset_settings``:
    what ``tag2mask bench`` records in a cell's settings guard before the segmenter is built)."""
    return get_preset(method, name).to_dict()
