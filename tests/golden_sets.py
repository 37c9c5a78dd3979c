"""Discovery of the CLIP-ES golden fixture sets under ``tests/data`` (a helper, not a test module).

A set is any ``tests/data/<folder>/index.json`` produced from the official CLIP-ES code
(``official_repo`` names CLIP-ES) that lists ``images``: today ``clip_es`` (VOC path) and
``clip_es_coco`` (COCO path). Everything a test needs is read from the set's ``index.json``: class
lists (``new_class_names*``, ``background_category*``, ``class_names*``), settings, per-image sizes,
labels and tolerances. No test names a set, a case, a size or a class count, so another set of the
same format can be dropped in.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fixture_sets import DATA_DIR, TINY_CLIP_PATH, FixtureCase, FixtureSet, find_sets

__all__ = ["DATA_DIR", "TINY_CLIP_PATH", "GoldenSet", "GoldenCase", "golden_sets", "SETS", "CASES", "SET_IDS",
           "CASE_IDS"]


def _first(index: dict[str, Any], prefix: str) -> list[str]:
    """The class list whose key starts with ``prefix`` (``new_class_names`` / ``new_class_names_coco``)."""
    keys = sorted(k for k in index if k.startswith(prefix))
    if not keys:
        raise KeyError(f"index.json has no {prefix}* list")
    return list(index[keys[0]])


class GoldenSet(FixtureSet):
    """One CLIP-ES fixture set."""

    @property
    def settings(self) -> dict[str, Any]:
        return self.index["settings"]

    @property
    def images(self) -> list[dict[str, Any]]:
        return self.index["images"]

    @property
    def prompt_names(self) -> list[str]:
        """The official foreground prompt names (synonyms written in), in class-id order."""
        return _first(self.index, "new_class_names")

    @property
    def plain_names(self) -> list[str]:
        return _first(self.index, "class_names")

    @property
    def background_words(self) -> list[str]:
        return _first(self.index, "background_category")

    @property
    def eval_num_classes(self) -> int:
        """Classes of the official evaluation (background included)."""
        return int(self.settings.get("eval_n_class", len(self.plain_names) + 1))

    @property
    def template(self) -> str:
        return self.settings["template"]

    @property
    def tokens(self) -> dict[str, Any] | None:
        path = self.root / "tokens.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def preset_name(self) -> str:
        """The tag2mask CLIP-ES preset whose vocabulary has exactly this set's prompt names."""
        from tag2mask.methods.clip_es.pipeline import PRESETS
        from tag2mask.vocab.vocabulary import get_vocabulary

        for name, config in PRESETS.items():
            vocab = get_vocabulary(config.vocabulary)
            if [p for group in vocab.prompt_names() for p in group] == self.prompt_names:
                return name
        raise LookupError(f"{self.root}: no CLIP-ES preset has these {len(self.prompt_names)} class prompts")


class GoldenCase(FixtureCase):
    """One image of a set: its ``index.json`` entry and (lazily) its ``.npz`` arrays."""

    def rgb(self) -> np.ndarray:
        """The image as the CRF reads it: 3 channels (grey images replicated), uint8."""
        from PIL import Image

        with Image.open(self.path("image")) as f:
            return np.asarray(f.convert("RGB"))

    def gt(self) -> np.ndarray:
        from PIL import Image

        with Image.open(self.path("gt")) as f:
            return np.asarray(f)


def golden_sets() -> list[GoldenSet]:
    """Every CLIP-ES golden set under ``tests/data`` (sorted by folder name)."""
    return [GoldenSet(root) for root in find_sets("CLIP-ES", "images")]


SETS = golden_sets()
CASES = [GoldenCase(s, e) for s in SETS for e in s.images]
SET_IDS = [s.name for s in SETS]
CASE_IDS = [c.id for c in CASES]
