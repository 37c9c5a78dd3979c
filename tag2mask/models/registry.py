"""Name -> (config dataclass, network class) registry and the one factory, :func:`build_segmenter`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

__all__ = ["SegmenterEntry", "SEGMENTERS", "register_segmenter", "segmenter_config", "build_segmenter"]


@dataclass(frozen=True)
class SegmenterEntry:
    """One registered network: its config dataclass, its class and a one-line description."""

    name: str
    config_cls: type
    model_cls: type
    description: str


#: every network :func:`build_segmenter` knows, by name
SEGMENTERS: dict[str, SegmenterEntry] = {}

#: keyword arguments of :func:`build_segmenter` that are not part of the saved config
_RUNTIME_KEYS = ("text_embeddings", "allow_download", "clip_model")


def register_segmenter(name: str, config_cls: type, model_cls: type, description: str) -> None:
    """Add a network to :data:`SEGMENTERS` (names are lower case; ``_`` and ``-`` are interchangeable)."""
    key = _normalise(name)
    if key in SEGMENTERS and SEGMENTERS[key].model_cls is not model_cls:
        raise ValueError(f"segmenter name {name!r} is already registered")
    SEGMENTERS[key] = SegmenterEntry(key, config_cls, model_cls, description)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _entry(name: str) -> SegmenterEntry:
    key = _normalise(name)
    if key not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; choose from {sorted(SEGMENTERS)}")
    return SEGMENTERS[key]


def segmenter_config(name: str, *, tiny: bool = False, **cfg: Any) -> Any:
    """The config dataclass of ``name`` with ``cfg`` applied (``tiny=True``: the test-sized preset)."""
    from tag2mask.config import config_from_dict

    entry = _entry(name)
    if tiny:
        base = dataclasses.asdict(entry.config_cls.tiny())
        if base.get("text_head") is not None and "text_head" not in cfg:
            cfg["text_head"] = base["text_head"]
        base.pop("text_head", None)
        cfg = {**base, **cfg}
    return config_from_dict(entry.config_cls, cfg)


def build_segmenter(
    name: str,
    num_classes: int,
    *,
    tiny: bool = False,
    text_embeddings: Optional[Tensor] = None,
    allow_download: Optional[bool] = None,
    clip_model: Any = None,
    config: Any = None,
    **cfg: Any,
):
    """Build a segmentation network by name.

    Args:
        name: one of :data:`SEGMENTERS` (``deeplab-v2``, ``deeplab-v3plus``, ``segformer``, ``upernet``,
            ``mask2former``, ``clip-decoder``).
        num_classes: logit channels C (with a text head: number of text embeddings, +1 with a
            learned background).
        tiny: start from the network's test-sized preset (``Config.tiny()``).
        text_embeddings: ``(K, D)`` CLIP text embeddings for a text-embedding head (implies
            ``text_head`` with defaults when none is configured).
        allow_download: allow hub / registry downloads of pretrained weights (default: the
            ``TAG2MASK_ALLOW_DOWNLOAD`` environment variable).
        clip_model: an already loaded :class:`~tag2mask.clip.CLIP` for ``clip-decoder`` (shared
            with a teacher, say) instead of ``clip_weights``.
        config: a ready config dataclass (then ``cfg`` must be empty).
        **cfg: fields of the network's config dataclass, e.g. ``variant='b2'``, ``pretrained=PATH``.

    Returns:
        A :class:`~tag2mask.models.base.Segmenter` in training mode.
    """
    from tag2mask.models.text_head import TextHeadConfig

    entry = _entry(name)
    if config is None:
        config = segmenter_config(name, tiny=tiny, **cfg)
    elif cfg or tiny:
        raise ValueError("pass either config= or keyword options, not both")
    if text_embeddings is not None and getattr(config, "text_head", None) is None:
        if not any(f.name == "text_head" for f in dataclasses.fields(config)):
            raise ValueError(f"{entry.name} does not support a text-embedding head")
        config.text_head = TextHeadConfig()
    runtime: dict[str, Any] = {}
    if text_embeddings is not None:
        runtime["text_embeddings"] = text_embeddings
    if allow_download is not None:
        runtime["allow_download"] = allow_download
    if clip_model is not None:
        runtime["clip_model"] = clip_model
    accepted = getattr(entry.model_cls, "runtime_options", ("text_embeddings",))
    if "allow_download" not in accepted:
        runtime.pop("allow_download", None)  # networks that only read local files ignore the permission
    rejected = sorted(set(runtime) - set(accepted))
    if rejected:
        raise ValueError(f"{entry.name} does not take {rejected}")
    return entry.model_cls(config, num_classes, **runtime)
