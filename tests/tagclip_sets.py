"""Discovery of the TagCLIP golden sets under ``tests/data`` and the comparisons the tests share (a helper).

A set is any ``tests/data/<folder>/index.json`` whose ``official_repo`` names TagCLIP and that lists
``cases``. Everything is read from the set: modes, class lists, constants, per-case sizes, decisions,
``fragile`` lists and ``suggested_tolerance``; no test names a set, case, size or class count.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from fixture_sets import DATA_DIR, TINY_CLIP_PATH, FixtureCase, FixtureSet, find_sets

__all__ = ["DATA_DIR", "TINY_CLIP_PATH", "TagSet", "TagCase", "tag_sets", "SETS", "CASES", "CASE_IDS", "MODES",
           "MODE_IDS", "max_abs", "rel", "fragile_entries"]


class TagSet(FixtureSet):
    """One TagCLIP fixture set."""

    @property
    def modes(self) -> dict[str, Any]:
        return self.index["settings"]["modes"]

    @property
    def templates(self) -> list[str]:
        return self.index["settings"]["templates"]

    @cached_property
    def text(self) -> dict[str, np.ndarray]:
        with np.load(self.root / "text.npz") as z:
            return {k: z[k] for k in z.files}

    def preset_name(self, mode: str) -> str:
        """The tag2mask TagCLIP preset whose texts are exactly this mode's ``class_names``."""
        from tag2mask.methods.tagclip.presets import PRESETS

        names = self.modes[mode]["class_names"]
        for key, config in PRESETS.items():
            if list(config.texts) == names and config.num_classes == self.modes[mode]["num_classes"]:
                return key
        raise LookupError(f"{self.root}: no TagCLIP preset has the {len(names)} texts of mode {mode!r}")

    def cases_of(self, mode: str) -> list["TagCase"]:
        return [TagCase(self, c) for c in self.index["cases"] if c["mode"] == mode]


class TagCase(FixtureCase):
    """One case of a set: its ``index.json`` entry and (lazily) its ``.npz`` arrays."""

    @property
    def mode(self) -> dict[str, Any]:
        return self.set.modes[self.entry["mode"]]

    @property
    def cls(self) -> dict[str, Any]:
        return self.entry["classification"]

    @property
    def tol(self) -> dict[str, Any]:
        return self.entry["suggested_tolerance"]

    def cls_arrays(self) -> dict[str, np.ndarray]:
        return {k[4:]: v for k, v in self.arrays.items() if k.startswith("cls.")}


def tag_sets() -> list[TagSet]:
    """Every TagCLIP golden set under ``tests/data`` (sorted by folder name)."""
    return [TagSet(root) for root in find_sets("TagCLIP", "cases")]


SETS = tag_sets()
CASES = [TagCase(s, c) for s in SETS for c in s.index["cases"]]
CASE_IDS = [c.id for c in CASES]
MODES = [(s, m) for s in SETS for m in s.modes if s.cases_of(m)]
MODE_IDS = [f"{s.name}/{m}" for s, m in MODES]


def max_abs(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def rel(a, b) -> float:
    """max |a - b| relative to the reference's max |b|."""
    return max_abs(a, b) / max(float(np.abs(np.asarray(b)).max()) if np.size(b) else 0.0, 1e-30)


def fragile_entries(case: TagCase) -> set[tuple[int, int]]:
    return {tuple(e) for e in case.entry["fragile"]["attn_vote_entries_i_j"]}


def compare_end_to_end(ours: dict[str, np.ndarray], case: TagCase) -> None:
    """Every ``cls.*`` array of ``case`` against ``ours`` (README 6.2 tolerances, 6.3 fragile decisions).

    A vote count may differ only at a listed fragile entry, a class mask only for a listed fragile
    text; the columns such a difference feeds are then left to the stage-isolated tests.
    """
    ref, tol = case.cls_arrays(), case.tol["classification"]
    assert set(ref) <= set(ours), sorted(set(ref) - set(ours))
    np.testing.assert_array_equal(ours["input"], ref["input"])
    np.testing.assert_array_equal(ours["pos_emb_new"], ref["pos_emb_new"])
    assert max_abs(ours["image_features"], ref["image_features"]) <= tol["image_features"]
    assert max_abs(ours["logits_coarse"], ref["logits_coarse"]) <= tol["logits_coarse"]
    for key in ("attn_layers", "attn_layer_mean", "attn_sel_mean"):
        if key in ref:
            assert rel(ours[key], ref[key]) <= tol["attn_rel"], key
    flipped = {tuple(int(v) for v in ij) for ij in np.argwhere(ours["attn_vote_count"] != ref["attn_vote_count"])}
    assert flipped <= fragile_entries(case), f"vote counts differ outside the fragile list: {sorted(flipped)[:10]}"
    keep = np.ones(ref["attn_weight"].shape, dtype=bool)
    for i, j in flipped:
        keep[i, j] = False
    assert max_abs(ours["attn_weight"][keep], ref["attn_weight"][keep]) <= tol["attn_rel"] * np.abs(ref["attn_weight"]).max()
    texts = [int(c) for c in np.flatnonzero((ours["mask_attn_box_mask"] != ref["mask_attn_box_mask"]).any(axis=(1, 2)))]
    assert set(texts) <= set(case.entry["fragile"]["mask_attn_classes"]), f"class masks differ for texts {texts}"
    if not flipped:
        assert rel(ours["logits_attn"], ref["logits_attn"]) <= tol["logits_attn_rel"]
        cols = [c for c in range(ref["logits_refined"].shape[1]) if c not in texts]
        scale = np.abs(ref["logits_refined"]).max()
        assert max_abs(ours["logits_refined"][:, cols], ref["logits_refined"][:, cols]) <= tol["logits_refined_rel"] * scale
        assert max_abs(ours["logits_max"][cols], ref["logits_max"][cols]) <= tol["logits_max_rel"] * np.abs(ref["logits_max"]).max()
    np.testing.assert_array_equal(ours["crop_mask14"], ref["crop_mask14"])  # shape too: (0, ...) with no crop
    # exact (README 6.1): same input, same boxes, the bilinear kernel the reference ran (cwr._bilinear_planes)
    np.testing.assert_array_equal(ours["crop_input_center"], ref["crop_input_center"])
    assert max_abs(ours["crop_cls_feature"], ref["crop_cls_feature"]) <= tol["crop_cls_feature"]
    assert max_abs(ours["crop_probs"], ref["crop_probs"]) <= tol["crop_probs"]
    assert rel(ours["cwr_scores"], ref["cwr_scores"]) <= tol["cwr_scores_rel"]
