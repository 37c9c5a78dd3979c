"""What every golden-fixture helper shares (a helper, not a test module): finding the sets of one official
code under ``tests/data`` by their ``index.json``, and a set / case pair that reads files and arrays lazily.

A set is a folder ``tests/data/<name>/`` whose ``index.json`` names the official repository
(``official_repo``) and lists its cases under one key; nothing here names a set, case, size or class count.
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
TINY_CLIP_PATH = DATA_DIR / "tiny_clip" / "tiny_clip_vit16_openai.pt"


def find_sets(official: str, cases_key: str) -> list[Path]:
    """Folders under ``tests/data`` (sorted) whose ``index.json`` names ``official`` in ``official_repo`` and
    lists a non-empty ``cases_key``; an unparsable ``index.json`` belongs to no set."""
    out = []
    for index in sorted(DATA_DIR.glob("*/index.json")):
        try:
            meta = json.loads(index.read_text())
        except ValueError:
            continue
        if official in str(meta.get("official_repo", "")) and meta.get(cases_key):
            out.append(index.parent)
    return out


class FixtureSet:
    """One set: its folder and parsed ``index.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.index: dict[str, Any] = json.loads((root / "index.json").read_text())

    @property
    def name(self) -> str:
        return self.root.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FixtureCase:
    """One case of a set: its ``index.json`` entry and (lazily) its ``arrays`` ``.npz``."""

    def __init__(self, fixture_set: FixtureSet, entry: dict[str, Any]) -> None:
        self.set = fixture_set
        self.entry = entry

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def id(self) -> str:
        return f"{self.set.name}/{self.name}"

    def path(self, key: str) -> Path:
        """Absolute path of a file named in the entry (``'image'``, ``'gt'``, ``'arrays'`` ...)."""
        return self.set.root / self.entry[key]

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.path("arrays")) as z:
            return {k: z[k] for k in z.files}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"


def assert_close(name: str, ours: np.ndarray, ref: np.ndarray, tol: float) -> None:
    """``max |ours - ref| <= tol`` (float64), same shape; the message names the array and the error."""
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    err = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    assert err <= tol, f"{name}: max |diff| {err:.3g} > tolerance {tol:.3g}"


def assert_labels(name: str, ours: np.ndarray, ref: np.ndarray, allowed: int) -> None:
    """Same shape and dtype, at most ``allowed`` pixels with another label."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, f"{name}: {ours.shape} {ours.dtype}"
    wrong = int((ours != ref).sum())
    assert wrong <= allowed, f"{name}: {wrong} pixels differ (allowed {allowed})"


@lru_cache(maxsize=None)
def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (read once per path and test session)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
