"""Save a trained segmenter as one ``.safetensors`` file and rebuild it without the training code.

File layout: the tensors of ``model.state_dict()`` minus frozen parts that are reloaded from their
own source (the CLIP tower of ``clip-decoder``, recorded by path and fingerprint), and in the
safetensors metadata ``tag2mask_segmenter`` = JSON::

    {"format": 1, "name": "segformer", "num_classes": 21, "config": {...},
     "normalization": {"mean": [...], "std": [...]}, "output_stride": 4}

plus any string metadata the caller adds (class names, say). Loading reads only tensors and JSON
(no pickle), rebuilds the network with :func:`~tag2mask.models.build_segmenter` from the stored
config (``transformers`` networks from their stored ``hf_config``: no hub access) and loads the
tensors strictly. Writes are atomic (:mod:`tag2mask.io.atomic`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from tag2mask.clip.loading import WeightsError, WeightsNotFoundError
from tag2mask.io.atomic import atomic_path
from tag2mask.io.json_files import loads_named
from tag2mask.models.base import Segmenter

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "save_segmenter", "read_segmenter_header", "load_segmenter"]

FORMAT_VERSION = 1
METADATA_KEY = "tag2mask_segmenter"


def save_segmenter(model: Segmenter, path: Union[str, Path], metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``); returns the path.

    ``metadata``: extra string entries stored in the file header (``METADATA_KEY`` is reserved).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: segmenters are saved as .safetensors files")
    header = {
        "format": FORMAT_VERSION,
        "name": model.name,
        "num_classes": model.num_classes,
        "config": model.export_config(),
        "normalization": model.normalization.to_dict(),
        "output_stride": model.output_stride,
    }
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if METADATA_KEY in meta:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved")
    meta[METADATA_KEY] = json.dumps(header)
    skip = model.frozen_prefixes()
    # clone: safetensors refuses tensors that share storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith(skip)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_segmenter_header(path: Union[str, Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(header, other metadata)`` of a saved segmenter, without reading its tensors."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError(f"{p}: no such segmenter file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # not safetensors, truncated header
        raise WeightsError(f"{p}: not a safetensors file ({type(e).__name__}: {e})") from e
    if METADATA_KEY not in meta:
        raise WeightsError(f"{p}: a safetensors file, but not a tag2mask segmenter (no {METADATA_KEY!r} metadata)")
    try:
        header = loads_named(meta.pop(METADATA_KEY), f"{p} (segmenter metadata)")
    except ValueError as e:
        raise WeightsError(str(e)) from None
    if not isinstance(header, dict):
        raise WeightsError(f"{p}: corrupt segmenter metadata (not a JSON object)")
    if header.get("format") != FORMAT_VERSION:
        raise WeightsError(f"{p}: segmenter format {header.get('format')!r}, this tag2mask reads {FORMAT_VERSION}")
    return header, meta


def load_segmenter(
    path: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    *,
    clip_weights: Optional[str] = None,
    clip_model: Any = None,
    allow_download: Optional[bool] = None,
) -> Segmenter:
    """Rebuild a segmenter saved by :func:`save_segmenter`; returned in eval mode on ``device``.

    ``clip_weights`` / ``clip_model`` override where a ``clip-decoder`` finds its frozen CLIP (the
    recorded fingerprint must match).
    """
    from safetensors.torch import load_file

    from tag2mask.models.registry import build_segmenter

    p = Path(path)
    header, _ = read_segmenter_header(p)
    config = dict(header["config"])
    runtime: dict[str, Any] = {}
    if header["name"] == "clip-decoder":
        if clip_weights is not None:
            config["clip_weights"] = clip_weights
        if clip_model is not None:
            runtime["clip_model"] = clip_model
    elif clip_weights is not None or clip_model is not None:
        raise ValueError(f"{p}: a {header['name']} has no CLIP backbone; clip_weights/clip_model do not apply")
    model = build_segmenter(header["name"], header["num_classes"], allow_download=allow_download, **runtime, **config)
    try:
        tensors = load_file(str(p))
    except Exception as e:
        raise WeightsError(f"{p}: could not read the tensors ({type(e).__name__}: {e})") from e
    own = model.state_dict()
    skip = model.frozen_prefixes()
    expected = {k for k in own if not k.startswith(skip)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise WeightsError(f"{p}: tensors do not match the stored {header['name']} config; missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    bad = [k for k in tensors if tuple(tensors[k].shape) != tuple(own[k].shape)]
    if bad:
        raise WeightsError(f"{p}: shape mismatch for {bad[:5]}")
    model.load_state_dict(tensors, strict=False)
    return model.to(device).eval()
