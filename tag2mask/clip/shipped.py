"""The tiny CLIP shipped inside the package: where it is, how to recognise it, what to tell users.

It was trained only on tag2mask's synthetic shapes world (``docs/tiny_clip.md``), so every command
that runs it on other images says so once, and the pages and run records repeat the note.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

__all__ = ["SHIPPED_WEIGHTS", "TINY_CLIP_NOTE", "is_shipped_tiny_clip", "tiny_clip_path"]

SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "tiny_clip.safetensors"

TINY_CLIP_NOTE = (
    "the tiny CLIP shipped with tag2mask knows only the synthetic shapes world (tag2mask synth): its masks on "
    "other images mean nothing. For real images pass real CLIP weights, e.g. --weights ViT-B-16.pt (OpenAI's "
    "file; .safetensors files and Hugging Face folders work too, see 'Weights' in the README)."
)


def is_shipped_tiny_clip(model: object) -> bool:
    """Whether ``model`` was loaded from the shipped tiny CLIP (the file itself or a byte-identical copy).

    Compares the content fingerprint :func:`~tag2mask.clip.loading.load_clip` stores on the model;
    anything without one (a randomly initialised CLIP) is not the shipped model.
    """
    fingerprint = str(getattr(model, "fingerprint", "") or "")
    shipped = _shipped_fingerprint()
    return shipped is not None and fingerprint.split(":")[0] == shipped


@functools.lru_cache(maxsize=None)
def _shipped_fingerprint() -> Optional[str]:
    from tag2mask.clip.loading import file_fingerprint

    return file_fingerprint(SHIPPED_WEIGHTS) if SHIPPED_WEIGHTS.is_file() else None


def tiny_clip_path() -> Path:
    """Path of the shipped tiny CLIP (``tag2mask/assets/tiny_clip.safetensors``), for :func:`load_clip`."""
    return SHIPPED_WEIGHTS
