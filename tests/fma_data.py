"""Access to the FMA-WSSS golden set in ``tests/data/fma`` (README there; section 6 = tolerances).

Everything is read from ``index.json``: cases, settings, class lists and tolerances, so another
set of the same format can replace this one without touching the tests.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA = Path(__file__).parent / "data" / "fma"
TINY_CLIP = Path(__file__).parent / "data" / "tiny_clip" / "tiny_clip_vit16_openai.pt"


@lru_cache(maxsize=1)
def index() -> dict[str, Any]:
    return json.loads((DATA / "index.json").read_text(encoding="utf-8"))


def files() -> dict[str, Any]:
    return index()["files"]


def cases(file: str) -> list[dict[str, Any]]:
    return files()[file]["cases"]


def case_ids(file: str) -> list[str]:
    return [c["name"] for c in cases(file)]


@lru_cache(maxsize=None)
def arrays(file: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{file}.npz") as z:
        return {k: z[k] for k in z.files}


def prompt_settings() -> list[str]:
    """The prompt settings of the set (keys of ``files.prompt`` that carry a ``config``)."""
    return [k for k, v in files()["prompt"].items() if isinstance(v, dict) and "config" in v]


@lru_cache(maxsize=1)
def fixture_clip():
    """The tiny CLIP loaded plainly (float32 weights): FMAClip applies FMA-WSSS's numerics itself."""
    from tag2mask.clip.loading import load_clip

    return load_clip(TINY_CLIP)


def fma_model(setting: str, clip=None):
    """:class:`FMAClip` over the fixture CLIP with the prompts of ``files.prompt.<setting>``."""
    from tag2mask.methods.fma.model import FMAClip

    return FMAClip(clip if clip is not None else fixture_clip(), prompt_learner(setting),
                   n_fg=files()["prompt"][setting]["n_fg"])


def prompt_learner(setting: str):
    """A :class:`PromptLearner` built from ``files.prompt.<setting>`` (its context drawn by the seed)."""
    from tag2mask.methods.fma.prompts import PromptLearner

    entry = files()["prompt"][setting]
    cfg = entry["config"]
    return PromptLearner(fixture_clip(), entry["classnames"], n_ctx=cfg["n_ctx"], class_specific=cfg["csc"],
                         name_position=cfg["cls_token_pos"], ctx_std=cfg["ctx_std"], seed=cfg["initialize_seed"])


def normalise(img_u8: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, ``ToTensor`` + CLIP ``Normalize`` in float32."""
    from tag2mask.clip.model import CLIP_MEAN, CLIP_STD

    x = torch.from_numpy(img_u8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def default_tol(expected) -> float:
    """README section 6's floor, ``8 * 2**-23 * max|ref|`` over the finite values, for arrays the
    index gives no tolerance for (the finite part of a NaN case)."""
    e = np.asarray(expected, dtype=np.float64)
    finite = e[np.isfinite(e)]
    return 8 * 2.0**-23 * (float(np.abs(finite).max()) if finite.size else 0.0)


def assert_close(actual, expected, tol: float, what: str) -> None:
    """max |actual - expected| <= tol, with NaN/inf positions required to match exactly."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    bad_a, bad_e = ~np.isfinite(a), ~np.isfinite(e)
    assert np.array_equal(bad_a, bad_e), f"{what}: non-finite positions differ"
    assert np.array_equal(a[bad_a], e[bad_e], equal_nan=True), f"{what}: non-finite values differ"
    if (~bad_e).any():
        diff = np.abs(a[~bad_e] - e[~bad_e]).max()
        assert diff <= tol, f"{what}: max abs diff {diff:.3g} > tol {tol:.3g}"
