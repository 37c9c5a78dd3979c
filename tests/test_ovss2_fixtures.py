"""SC-CLIP and PEARL against golden data from their official code (``tests/data/ovss2``).

Data-driven over ``tests/data/ovss2/index.json`` (README there): every case of a method built here
is run end to end from the image and the tiny checkpoint, through the Python API
(``preset="published"`` with the fixture's settings as overrides) and through ``tag2mask segment``;
every array of the case must match within ``tolerances.<method>.<array>``, label maps up to
``label_max_mismatch`` pixels, anomaly sets and window boxes exactly. Nothing here names a case, a
size or a class count: another set of this format can be dropped in.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.clip.loading import load_clip
from tag2mask.io.palette import read_label_png
from tag2mask.methods.ovss2 import NewerOvssSegmenter
from tag2mask.methods.ovss2.pearl import tlp_text_matrix
from tag2mask.vocab.vocabulary import load_vocabulary

DATA = Path(__file__).parent / "data" / "ovss2"
INDEX = json.loads((DATA / "index.json").read_text())
#: fixture method keys of the methods NewerOvssSegmenter runs (the official repo names the method)
METHOD_KEYS = sorted(k for k, m in INDEX["methods"].items() if m["repo"] in ("scclip", "pearl"))
CASE_KEYS = sorted(c for c, case in INDEX["cases"].items() if case["method"] in METHOD_KEYS)
EXACT = {"win_boxes", "win_outliers"}  # fp32 and fp64 agreed on every window and anomaly set


def run_spec(key: str) -> tuple[str, dict]:
    """tag2mask method and ``published``-preset overrides that reproduce fixture method ``key``."""
    meta = INDEX["methods"][key]
    s = meta["settings"]
    options = {"short_side": s["short"], "logit_scale": float(s["logit_scale"]),
               "prob_threshold": float(s["prob_thd"]), "area_threshold": s.get("area_thd")}
    if s["crop"] > 0:
        options.update(mode="slide", crop=s["crop"], stride=s["stride"])
    else:
        options["mode"] = "whole"
    if meta["repo"] == "pearl":
        options.update(alpha_kk=float(s["alpha_kk"]), tlp_grid=int(s["grid"]))
    return meta["repo"], options


@lru_cache(maxsize=None)
def arrays_of(image: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{image}.npz") as z:
        return {k: z[k] for k in z.files}


@lru_cache(maxsize=None)
def text_arrays() -> dict[str, np.ndarray]:
    with np.load(DATA / "text.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def name_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("names") / "cls_fixture.txt"
    path.write_text("\n".join(INDEX["names"]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def segmenters(tiny_clip_path, name_file):
    model = load_clip(tiny_clip_path)
    cache: dict[str, NewerOvssSegmenter] = {}

    def get(key: str) -> NewerOvssSegmenter:
        if key not in cache:
            method, options = run_spec(key)
            vocab = load_vocabulary(str(name_file), first_line_background=True)
            cache[key] = NewerOvssSegmenter(model, vocab, method, preset="published", text_cache=False,
                                            device="cpu", **options)
        return cache[key]

    return get


def _assert_close(name: str, ours: np.ndarray, ref: np.ndarray, tol: float) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    err = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    assert err <= tol, f"{name}: max |diff| {err:.3g} > tolerance {tol:.3g}"


def _assert_labels(name: str, ours: np.ndarray, ref: np.ndarray, allowed: int) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, f"{name}: {ours.shape} {ours.dtype}"
    wrong = int((ours != ref).sum())
    assert wrong <= allowed, f"{name}: {wrong} pixels differ (allowed {allowed})"


def test_the_set_has_cases_of_every_method_built_here():
    assert {INDEX["methods"][k]["repo"] for k in METHOD_KEYS} == {"scclip", "pearl"}
    assert all(any(INDEX["cases"][c]["method"] == k for c in CASE_KEYS) for k in METHOD_KEYS)


@pytest.mark.parametrize("key", METHOD_KEYS)
def test_text_embeddings(segmenters, key):
    seg = segmenters(key)
    ours_words = list(seg.vocab.background) + [w for syns in seg.vocab.synonyms for w in syns]
    assert ours_words == [" ".join(w.split()) for w in INDEX["methods"][key]["query_words"]]
    assert seg.prompt_label.tolist() == INDEX["methods"][key]["query_idx"]
    _assert_close("text", seg.text.numpy(), text_arrays()[f"{key}.text"], INDEX["tolerances"][key]["text"])
    if f"{key}.tlp_S" in text_arrays():  # PEARL's text matrix (TLP uses its diagonal)
        _assert_close("tlp_S", tlp_text_matrix(seg.text).numpy(), text_arrays()[f"{key}.tlp_S"], 1e-6)


@pytest.mark.parametrize("case_key", CASE_KEYS)
def test_arrays_match_official(segmenters, case_key):
    case = INDEX["cases"][case_key]
    key, ref = case["method"], arrays_of(case["image"])
    tol = INDEX["tolerances"][key]
    res = segmenters(key).predict(Image.fromarray(ref["image"]), keep_arrays=True)
    ours = res.arrays
    np.testing.assert_array_equal(ours["input"], ref[case["input_key"]])
    assert list(ours["input"].shape[1:]) == case["input_hw"]
    assert len(ours["win_boxes"]) == case["n_windows"]
    assert list(ours["win_feats"].shape[-2:]) == case["feat_hw"]
    if "tlp_grid_hw" in case:
        assert list(ours["tlp_agree"].shape[-2:]) == case["tlp_grid_hw"]
    names = [k.split(".", 1)[1] for k in ref if k.startswith(key + ".")]
    assert {"win_boxes", "win_feats", "win_patch_logits", "logits", "probs", "label"} <= set(names)
    for name in names:
        assert name in ours, f"fixture array {key}.{name} is not produced"
        if name in EXACT:
            np.testing.assert_array_equal(ours[name], ref[f"{key}.{name}"], err_msg=name)
        elif name == "label":
            _assert_labels(name, ours[name], ref[f"{key}.{name}"], case["label_max_mismatch"])
        else:
            assert name in tol, f"fixture array {key}.{name} has no tolerance"
            _assert_close(name, ours[name], ref[f"{key}.{name}"], tol[name])
    counts = np.bincount(res.label.ravel(), minlength=len(case["label_counts"]))
    assert np.abs(counts - np.asarray(case["label_counts"])).sum() <= 2 * case["label_max_mismatch"]
    np.testing.assert_array_equal(res.label, ours["label"])


# --------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for image in INDEX["images"]:
        Image.fromarray(arrays_of(image)["image"]).save(folder / f"{image}.png")  # lossless
    return folder


def _cli_args(key: str, name_file: Path, folder: Path, out: Path, weights: Path) -> list[str]:
    method, options = run_spec(key)
    argv = ["segment", str(folder), "--classes", str(name_file), "--first-line", "background", "--method", method,
            "--preset", "published", "--weights", str(weights), "--out", str(out), "--device", "cpu",
            "--save-logits", "--quiet", "--mode", options["mode"], "--short-side", str(options["short_side"]),
            "--logit-scale", repr(options["logit_scale"]), "--prob-threshold", repr(options["prob_threshold"])]
    if options["mode"] == "slide":
        argv += ["--crop", str(options["crop"]), "--stride", str(options["stride"])]
    if options["area_threshold"] is not None:
        argv += ["--area-threshold", repr(float(options["area_threshold"]))]
    if "alpha_kk" in options:
        argv += ["--alpha-kk", repr(options["alpha_kk"]), "--tlp-grid", str(options["tlp_grid"])]
    return argv


@pytest.mark.parametrize("key", METHOD_KEYS)
def test_command_reproduces_official(key, name_file, image_folder, tiny_clip_path, tmp_path, monkeypatch):
    from tag2mask.cli.main import main

    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(_cli_args(key, name_file, image_folder, out, tiny_clip_path)) == 0
    for case in (INDEX["cases"][c] for c in CASE_KEYS):
        if case["method"] != key:
            continue
        ref = arrays_of(case["image"])
        label = read_label_png(out / "masks" / f"{case['image']}.png")
        _assert_labels("label", label, ref[f"{key}.label"], case["label_max_mismatch"])
        with np.load(out / "logits" / f"{case['image']}.npz") as z:
            _assert_close("probs", z["probs"], ref[f"{key}.probs"], INDEX["tolerances"][key]["probs"])
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["resolved"]["round_fp16_weights"] is True
    assert record["settings"]["resolved"]["method"] == run_spec(key)[0]
