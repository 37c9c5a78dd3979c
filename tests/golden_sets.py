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
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
TINY_CLIP_PATH = DATA_DIR / "tiny_clip" / "tiny_clip_vit16_openai.pt"


def _first(index: dict[str, Any], prefix: str) -> list[str]:
    """The class list whose key starts with ``prefix`` (``new_class_names`` / ``new_class_names_coco``)."""
    keys = sorted(k for k in index if k.startswith(prefix))
    if not keys:
        raise KeyError(f"index.json has no {prefix}* list")
    return list(index[keys[0]])


class GoldenSet:
    """One fixture set: its folder and parsed ``index.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.index: dict[str, Any] = json.loads((root / "index.json").read_text())

    @property
    def name(self) -> str:
        return self.root.name

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

    def __repr__(self) -> str:
        return f"GoldenSet({self.name!r})"


class GoldenCase:
    """One image of a set: its ``index.json`` entry and (lazily) its ``.npz`` arrays."""

    def __init__(self, golden: GoldenSet, entry: dict[str, Any]) -> None:
        self.set = golden
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

    def rgb(self) -> np.ndarray:
        """The image as the CRF reads it: 3 channels (grey images replicated), uint8."""
        from PIL import Image

        with Image.open(self.path("image")) as f:
            return np.asarray(f.convert("RGB"))

    def gt(self) -> np.ndarray:
        from PIL import Image

        with Image.open(self.path("gt")) as f:
            return np.asarray(f)

    def __repr__(self) -> str:
        return f"GoldenCase({self.id!r})"


def golden_sets() -> list[GoldenSet]:
    """Every CLIP-ES golden set under ``tests/data`` (sorted by folder name)."""
    out = []
    for index in sorted(DATA_DIR.glob("*/index.json")):
        try:
            meta = json.loads(index.read_text())
        except ValueError:
            continue
        if "CLIP-ES" in str(meta.get("official_repo", "")) and meta.get("images"):
            out.append(GoldenSet(index.parent))
    return out


SETS = golden_sets()
CASES = [GoldenCase(s, e) for s in SETS for e in s.images]
SET_IDS = [s.name for s in SETS]
CASE_IDS = [c.id for c in CASES]
