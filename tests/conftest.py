"""Shared fixtures for the tag2mask test-suite.

Golden-data fixtures (CLIP-ES, see ``tests/data/clip_es/README.md``) are data-driven: every test
that takes the ``clip_es_case`` argument is parametrised over *all* images listed in
``index.json`` (ids = image names), so the same tests run unchanged on another fixture set of the
same format.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DATA_DIR = Path(__file__).parent / "data"
CLIP_ES_DIR = DATA_DIR / "clip_es"
TINY_CLIP_PATH = DATA_DIR / "tiny_clip" / "tiny_clip_vit16_openai.pt"


def _read_clip_es_index() -> dict[str, Any]:
    with open(CLIP_ES_DIR / "index.json") as f:
        return json.load(f)


class ClipEsCase:
    """One image of the CLIP-ES golden set: its ``index.json`` entry and (lazily) its ``.npz`` arrays."""

    def __init__(self, entry: dict[str, Any], root: Path = CLIP_ES_DIR):
        self.entry = entry
        self.root = root

    @property
    def name(self) -> str:
        return self.entry["name"]

    def path(self, key: str) -> Path:
        """Absolute path of a file named in the entry (``'image'``, ``'gt'``, ``'annotation'``, ``'arrays'``)."""
        return self.root / self.entry[key]

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.path("arrays")) as z:
            return {k: z[k] for k in z.files}

    def __repr__(self) -> str:
        return f"ClipEsCase({self.name!r})"


# ---------------------------------------------------------------------------------------------------
# parametrisation


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "clip_es_case" in metafunc.fixturenames:
        images = _read_clip_es_index()["images"]
        metafunc.parametrize(
            "clip_es_case", [ClipEsCase(e) for e in images], ids=[e["name"] for e in images]
        )


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tiny_clip_path() -> Path:
    """The tiny CLIP ViT-16 checkpoint (OpenAI state-dict format) the golden fixtures were made with."""
    assert TINY_CLIP_PATH.exists(), TINY_CLIP_PATH
    return TINY_CLIP_PATH


@pytest.fixture(scope="session")
def clip_es_dir() -> Path:
    return CLIP_ES_DIR


@pytest.fixture(scope="session")
def clip_es_index() -> dict[str, Any]:
    """``tests/data/clip_es/index.json``, parsed."""
    return _read_clip_es_index()


@pytest.fixture(scope="session")
def clip_es_model(tiny_clip_path):
    """The tiny CLIP with the official CLIP-ES numerics (fp16-rounded weights, fp16-rounded pos-emb), eval, CPU fp32.

    Session-scoped and shared: treat it as read-only (do not change attributes or weights in a test).
    """
    from tag2mask.clip.loading import load_clip

    model = load_clip(tiny_clip_path, round_fp16_weights=True)
    model.visual.round_pos_embed_fp16 = True
    model.requires_grad_(False)
    return model
