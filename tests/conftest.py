"""Shared fixtures for the tag2mask test-suite.

Golden-data fixtures (CLIP-ES VOC and COCO paths, see ``tests/data/clip_es*/README.md``) are
data-driven: ``golden_sets.py`` discovers every set under ``tests/data`` and the tests parametrise
over *all* images listed in each set's ``index.json``, so the same tests run unchanged on another
fixture set of the same format.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parent / "data"
TINY_CLIP_PATH = DATA_DIR / "tiny_clip" / "tiny_clip_vit16_openai.pt"


@pytest.fixture(scope="session")
def tiny_clip_path() -> Path:
    """The tiny CLIP ViT-16 checkpoint (OpenAI state-dict format) the golden fixtures were made with."""
    assert TINY_CLIP_PATH.exists(), TINY_CLIP_PATH
    return TINY_CLIP_PATH
