"""The tiny CLIP shipped inside the package (trained on tag2mask's synthetic world only, see docs/tiny_clip.md)."""

from __future__ import annotations

from pathlib import Path


def tiny_clip_path() -> Path:
    """Path of the shipped tiny CLIP (``tag2mask/assets/tiny_clip.safetensors``), for :func:`load_clip`."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny_clip.safetensors"
