"""Pretrained ``transformers`` weights: a local folder, the local Hugging Face cache, or the hub when allowed.

Sources, tried in this order:

1. a folder written by ``save_pretrained`` (``config.json`` + ``model.safetensors``);
2. a hub id (``nvidia/mit-b0``) already in the local Hugging Face cache (works offline);
3. the hub itself, only when the user allows downloads (``allow_download=True``, ``--allow-download``
   or ``TAG2MASK_ALLOW_DOWNLOAD=1``, the convention of :func:`tag2mask.clip.load_clip`).

``transformers`` reads safetensors, or ``.bin`` files with ``weights_only=True``; remote code is
never trusted. Failures raise :class:`~tag2mask.clip.WeightsNotFoundError` /
:class:`~tag2mask.clip.WeightsError` with the source and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from tag2mask.clip.loading import WeightsError, WeightsNotFoundError
from tag2mask.clip.loading import downloads_allowed

__all__ = ["downloads_allowed", "require_transformers", "from_pretrained", "is_local_source"]


def require_transformers() -> Any:
    """Import ``transformers`` or explain how to get it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "SegFormer, UperNet and Mask2Former need the 'transformers' package: pip install 'tag2mask[hf]'"
        ) from e
    return transformers


def is_local_source(source: str) -> bool:
    """Whether ``source`` names something on disk (a path) rather than a hub id."""
    p = Path(source).expanduser()
    return p.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def from_pretrained(cls: Any, source: str, allow_download: Optional[bool] = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source, **kwargs)`` under tag2mask's download policy, with clear errors."""
    require_transformers()
    path = Path(source).expanduser()
    if is_local_source(source):
        if not path.is_dir():
            raise WeightsNotFoundError(
                f"{source}: no such folder (expected a transformers model folder written by save_pretrained, "
                f"with config.json and model.safetensors)"
            )
        if not (path / "config.json").is_file():
            raise WeightsError(f"{source}: not a transformers model folder (no config.json)")
        try:
            return cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise WeightsError(f"{source}: could not load a {cls.__name__} from this folder ({type(e).__name__}: {e})") from e
    allowed = downloads_allowed(allow_download)
    try:
        return cls.from_pretrained(source, local_files_only=not allowed, trust_remote_code=False, **kwargs)
    except OSError as e:
        if not allowed:
            raise WeightsNotFoundError(
                f"{source!r} is neither a local folder nor in the Hugging Face cache, and downloads are off. "
                f"Pass a folder saved with save_pretrained, or allow a hub download with --allow-download "
                f"or TAG2MASK_ALLOW_DOWNLOAD=1."
            ) from e
        raise WeightsNotFoundError(
            f"could not download {source!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Are you offline? Download it elsewhere, copy the folder here and pass its path."
        ) from e
