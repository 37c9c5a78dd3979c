"""SCLIP, NACLIP, ClearCLIP and MaskCLIP against golden data from their official code.

Data-driven over ``tests/data/ovss/index.json`` (README there): every case is run end to end from
the image and the tiny checkpoint, through the Python API (``preset="published"``) and through
``tag2mask segment --preset published``, with the fixture's settings as overrides; every array must
match within ``tolerances.<method>.<array>``, label maps up to ``label_max_mismatch`` pixels.
Nothing here names a case, a size or a class count: another set of this format can be dropped in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.clip.loading import load_clip
from tag2mask.io.palette import read_label_png
from tag2mask.methods.ovss.last_block import attention_weights
from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
from tag2mask.methods.ovss.last_block import neighbourhood_prior
from tag2mask.methods.ovss.numerics import fp16_rounding_targets
from tag2mask.vocab.vocabulary import load_vocabulary

from fixture_sets import assert_close, assert_labels, load_npz

DATA = Path(__file__).parent / "data" / "ovss"
INDEX = json.loads((DATA / "index.json").read_text())
METHOD_KEYS = sorted(INDEX["methods"])
CASE_KEYS = sorted(INDEX["cases"])
REPO = Path(__file__).resolve().parent.parent

# arrays compared by test_pamr_matches_official / test_last_block_attention
ELSEWHERE = {"logits_pamr", "label_pamr", "win0_lastblock_ln1", "win0_lastblock_attn"}

# ClearCLIP's model_type switch (ignore_residual=True) -> our last-block variants
CLEARCLIP_MODEL_TYPES = {"ClearCLIP": "clearclip", "vanilla": "clip-reduced", "MaskCLIP": "maskclip-reduced",
                         "SCLIP": "sclip-reduced"}


def run_spec(key: str) -> tuple[str, dict]:
    """tag2mask method and ``published``-preset overrides that reproduce fixture method ``key``.

    The official class / switch is read from the settings (README section 1): a ``model_type`` is
    ClearCLIP's harness, an ``attn_strategy`` NACLIP's; otherwise the key names the method.
    """
    settings = INDEX["methods"][key]["settings"]
    options = {
        "short_side": settings["short"], "logit_scale": float(settings["logit_scale"]),
        "prob_threshold": float(settings["prob_thd"]), "area_threshold": settings.get("area_thd"),
        "pamr": False,
    }
    if settings["crop"] > 0:
        options.update(mode="slide", crop=settings["crop"], stride=settings["stride"])
    else:
        options["mode"] = "whole"
    if "model_type" in settings:
        assert settings.get("ignore_residual", True), "only ClearCLIP's default ignore_residual=True is mapped"
        return "clearclip", dict(options, last_block=CLEARCLIP_MODEL_TYPES[settings["model_type"]])
    if "attn_strategy" in settings:
        assert (settings.get("arch"), settings["attn_strategy"]) == ("reduced", "naclip"), settings
        return "naclip", dict(options, naclip_std=float(settings["gaussian_std"]))
    return key, options


def pamr_spec(key: str) -> dict | None:
    """PAMR settings of fixture method ``key`` (``None`` when its outputs have no PAMR arrays)."""
    settings = INDEX["methods"][key]["settings"]
    if not settings.get("pamr_steps"):
        return None
    return {"pamr": True, "pamr_steps": settings["pamr_steps"], "pamr_dilations": tuple(settings["pamr_stride"])}


def arrays_of(image: str) -> dict[str, np.ndarray]:
    return load_npz(DATA / f"{image}.npz")


def text_arrays() -> dict[str, np.ndarray]:
    return load_npz(DATA / "text.npz")


@pytest.fixture(scope="module")
def name_file(tmp_path_factory) -> Path:
    """The fixture's name set written as an official ``cls_*.txt`` (line 1 = background)."""
    path = tmp_path_factory.mktemp("names") / "cls_fixture.txt"
    path.write_text("\n".join(INDEX["names"]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(tiny_clip_path):
    """The tiny CLIP as stored (full precision): the published presets round their own copy."""
    return load_clip(tiny_clip_path)


@pytest.fixture(scope="module")
def segmenters(model, name_file):
    cache: dict[tuple[str, bool], OpenVocabSegmenter] = {}

    def get(key: str, with_pamr: bool = False) -> OpenVocabSegmenter:
        if (key, with_pamr) not in cache:
            method, options = run_spec(key)
            if with_pamr:
                options.update(pamr_spec(key))
            vocab = load_vocabulary(str(name_file), first_line_background=True)
            cache[key, with_pamr] = OpenVocabSegmenter(model, vocab, method, preset="published", text_cache=False,
                                                       device="cpu", **options)
        return cache[key, with_pamr]

    return get


# --------------------------------------------------------------------------------------------------
# Python API


@pytest.mark.parametrize("key", METHOD_KEYS)
def test_text_embeddings(segmenters, key):
    seg = segmenters(key)
    words = INDEX["methods"][key]["query_words"]
    # prompt rows follow the name-set file: background line first, then the classes in order
    ours_words = list(seg.vocab.background) + [w for syns in seg.vocab.synonyms for w in syns]
    assert ours_words == [" ".join(w.split()) for w in words]
    assert seg.prompt_label.tolist() == INDEX["methods"][key]["query_idx"]
    assert_close("text", seg.text.numpy(), text_arrays()[f"{key}.text"], INDEX["tolerances"][key]["text"])


@pytest.mark.parametrize("key", METHOD_KEYS)
def test_published_presets_round_the_weights_like_the_official_loaders(model, segmenters, key):
    seg = segmenters(key)
    meta = INDEX["methods"][key]
    assert seg.model is not model  # the caller's full-precision model is left alone
    ours, original = dict(seg.model.named_parameters()), dict(model.named_parameters())
    targets = {id(t) for t in fp16_rounding_targets(model)}
    # the README counts the tensors that rounding changes (zero biases and LayerNorms are fp16-exact)
    changed = [n for n, p in original.items() if id(p) in targets and not torch.equal(p, p.half().float())]
    assert len(changed) == meta["fp16_rounded_params"]
    assert all(torch.equal(ours[n], original[n].half().float()) for n in changed)
    # every other parameter, fp16-exact or not (embeddings, logit scale), is left as it is
    kept = [n for n, p in original.items() if id(p) not in targets and not torch.equal(p, p.half().float())]
    assert len(kept) == meta["n_unrounded"] and set(meta["unrounded_examples"]) <= set(kept)
    assert all(torch.equal(ours[n], original[n]) for n in original if n not in changed)
    for name in meta["fp16_rounded_examples"]:
        assert torch.equal(ours[name], original[name].half().float()), name


@pytest.mark.parametrize("case_key", CASE_KEYS)
def test_arrays_match_official(segmenters, case_key):
    case = INDEX["cases"][case_key]
    key, ref = case["method"], arrays_of(case["image"])
    tol = INDEX["tolerances"][key]
    res = segmenters(key).predict(Image.fromarray(ref["image"]), keep_arrays=True)
    ours = res.arrays
    np.testing.assert_array_equal(ours["input"], ref[case["input_key"]])  # OpenCV-exact resize
    assert list(ours["input"].shape[1:]) == case["input_hw"]
    assert len(ours["win_boxes"]) == case["n_windows"]
    # every array of this method in the image's file is checked, here or by the PAMR / attention tests
    names = [k.split(".", 1)[1] for k in ref if k.startswith(key + ".")]
    assert {"win_boxes", "win_feats", "win_patch_logits", "logits", "probs", "label"} <= set(names)
    for name in names:
        if name in ELSEWHERE:
            continue
        if name == "win_boxes":
            np.testing.assert_array_equal(ours[name], ref[f"{key}.{name}"])
        elif name == "label":
            assert_labels(name, ours[name], ref[f"{key}.{name}"], case["label_max_mismatch"])
        else:
            assert name in tol, f"fixture array {key}.{name} has no tolerance"
            assert_close(name, ours[name], ref[f"{key}.{name}"], tol[name])
    np.testing.assert_array_equal(res.label, ours["label"])
    np.testing.assert_array_equal(res.probs, ours["probs"])


@pytest.mark.parametrize("case_key", [c for c in CASE_KEYS if pamr_spec(INDEX["cases"][c]["method"])])
def test_pamr_matches_official(segmenters, case_key):
    case = INDEX["cases"][case_key]
    key, ref = case["method"], arrays_of(case["image"])
    res = segmenters(key, with_pamr=True).predict(Image.fromarray(ref["image"]), keep_arrays=True)
    assert_close("logits", res.arrays["logits"], ref[f"{key}.logits"], INDEX["tolerances"][key]["logits"])
    assert_close("logits_pamr", res.arrays["logits_pamr"], ref[f"{key}.logits_pamr"],
                  INDEX["tolerances"][key]["logits_pamr"])
    assert_labels("label_pamr", res.label, ref[f"{key}.label_pamr"], case["label_pamr_max_mismatch"])


def test_naclip_published_preset_has_pamr_on(model, name_file):
    """The official constructor runs PAMR unless switched off; so does our published preset."""
    seg = OpenVocabSegmenter(model, str(name_file), "naclip", preset="published", text_cache=False)
    assert seg.settings.pamr and seg.settings.pamr_steps == 10 and seg.settings.pamr_dilations == (8, 16)
    for key in METHOD_KEYS:
        spec = pamr_spec(key)
        if spec and run_spec(key)[0] == "naclip":
            assert (spec["pamr_steps"], spec["pamr_dilations"]) == (10, (8, 16))


@pytest.mark.parametrize("case_key", [c for c in CASE_KEYS
                                      if f"{INDEX['cases'][c]['method']}.win0_lastblock_attn" in arrays_of(INDEX["cases"][c]["image"])])
def test_last_block_attention(segmenters, case_key):
    """From the official ``ln_1`` input of window 0, our variant's attention matrix (and its output)."""
    case = INDEX["cases"][case_key]
    key, ref = case["method"], arrays_of(case["image"])
    seg = segmenters(key)
    block = seg.model.visual.blocks[-1]
    patch = seg.model.visual.patch_size
    grid = (case["window_hw"][0] // patch, case["window_hw"][1] // patch)
    a = torch.from_numpy(ref[f"{key}.win0_lastblock_ln1"])[None]
    assert a.shape[1] == 1 + grid[0] * grid[1]
    weights = attention_weights(seg.settings.last_block, block, a, grid, std=seg.settings.naclip_std)
    assert_close("attention", weights[0].numpy(), ref[f"{key}.win0_lastblock_attn"],
                  INDEX["tolerances"][key]["win0_lastblock_attn"])


@pytest.mark.parametrize("name", [k for k in text_arrays() if k.endswith(".attention_addition")])
def test_naclip_neighbourhood_prior(name):
    key = name.split(".")[0]
    window = text_arrays()[f"{key}.gaussian_window"]
    grid = ((window.shape[0] + 1) // 2, (window.shape[1] + 1) // 2)
    std = float(INDEX["methods"][key]["settings"]["gaussian_std"])
    prior = neighbourhood_prior(grid, std).numpy()
    assert_close(name, prior, text_arrays()[name], 1e-6)


# --------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for image in INDEX["images"]:
        Image.fromarray(arrays_of(image)["image"]).save(folder / f"{image}.png")  # lossless
    return folder


#: every setting an index.json may record, and the ``tag2mask segment`` flag that sets it (or the
#: switch it selects: ``model_type`` / ``attn_strategy`` / ``arch`` pick the method and last block)
_CLI_FLAGS = {"short": "--short-side", "crop": "--crop", "stride": "--stride", "logit_scale": "--logit-scale",
              "prob_thd": "--prob-threshold", "area_thd": "--area-threshold", "gaussian_std": "--naclip-std",
              "pamr_steps": "--pamr-steps", "pamr_stride": "--pamr-dilations", "model_type": "--last-block",
              "attn_strategy": "--method", "arch": "--method", "ignore_residual": "--last-block"}


def _cli_args(key: str, name_file: Path, folder: Path, out: Path, weights: Path, with_pamr: bool) -> list[str]:
    """The command line of fixture method ``key``: every setting its index.json records is passed."""
    settings = INDEX["methods"][key]["settings"]
    unmapped = sorted(set(settings) - set(_CLI_FLAGS))
    assert not unmapped, f"index.json records settings the command line test does not pass: {unmapped}"
    method, options = run_spec(key)
    argv = ["segment", str(folder), "--classes", str(name_file), "--first-line", "background", "--method", method,
            "--preset", "published", "--weights", str(weights), "--out", str(out), "--device", "cpu",
            "--save-logits", "--quiet", "--mode", options["mode"], "--short-side", str(options["short_side"]),
            "--logit-scale", repr(options["logit_scale"]), "--prob-threshold", repr(options["prob_threshold"]),
            "--pamr" if with_pamr else "--no-pamr"]
    if options["mode"] == "slide":
        argv += ["--crop", str(options["crop"]), "--stride", str(options["stride"])]
    if options["area_threshold"] is not None:
        argv += ["--area-threshold", repr(float(options["area_threshold"]))]
    if "last_block" in options:
        argv += ["--last-block", options["last_block"]]
    if "naclip_std" in options:
        argv += ["--naclip-std", repr(options["naclip_std"])]
    if with_pamr:
        pamr = pamr_spec(key)
        argv += ["--pamr-steps", str(pamr["pamr_steps"]), "--pamr-dilations", ",".join(map(str, pamr["pamr_dilations"]))]
    return argv


def _check_outputs(key: str, out: Path, with_pamr: bool) -> None:
    for case_key in CASE_KEYS:
        case = INDEX["cases"][case_key]
        if case["method"] != key:
            continue
        ref = arrays_of(case["image"])
        label = read_label_png(out / "masks" / f"{case['image']}.png")
        if with_pamr:
            assert_labels("label_pamr", label, ref[f"{key}.label_pamr"], case["label_pamr_max_mismatch"])
            continue
        assert_labels("label", label, ref[f"{key}.label"], case["label_max_mismatch"])
        with np.load(out / "logits" / f"{case['image']}.npz") as z:
            assert_close("probs", z["probs"], ref[f"{key}.probs"], INDEX["tolerances"][key]["probs"])


COMMAND_RUNS = [(key, False) for key in METHOD_KEYS] + [(key, True) for key in METHOD_KEYS if pamr_spec(key)]


@pytest.mark.parametrize("key,with_pamr", COMMAND_RUNS, ids=[k + ("-pamr" if p else "") for k, p in COMMAND_RUNS])
def test_command_reproduces_official(key, with_pamr, name_file, image_folder, tiny_clip_path, tmp_path, monkeypatch):
    from tag2mask.cli.main import main

    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(_cli_args(key, name_file, image_folder, out, tiny_clip_path, with_pamr)) == 0
    _check_outputs(key, out, with_pamr)
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["resolved"]["round_fp16_weights"] is True
    assert record["preset"].startswith("published")
    _, options = run_spec(key)
    if "naclip_std" in options:  # the recorded window width is what ran
        assert record["settings"]["resolved"]["naclip_std"] == options["naclip_std"]


def test_python_m_tag2mask_segment(name_file, image_folder, tiny_clip_path, tmp_path):
    """The same through ``python -m tag2mask`` in a fresh process (first method of the set)."""
    key = METHOD_KEYS[0]
    out = tmp_path / "out"
    env = dict(os.environ, TAG2MASK_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "tag2mask", *_cli_args(key, name_file, image_folder, out, tiny_clip_path, False)]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_outputs(key, out, with_pamr=False)


def test_naclip_window_and_pamr_flags(name_file, image_folder, tiny_clip_path, tmp_path, monkeypatch, capsys):
    """--naclip-std / --pamr-steps / --pamr-dilations reach the run; where they do not apply they are errors."""
    from tag2mask.cli.main import main

    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    base = ["segment", str(image_folder), "--classes", str(name_file), "--first-line", "background",
            "--weights", str(tiny_clip_path), "--device", "cpu", "--quiet", "--short-side", "64", "--mode", "whole"]
    out = tmp_path / "narrow"
    assert main(base + ["--method", "naclip", "--naclip-std", "2.5", "--pamr", "--pamr-steps", "3",
                        "--pamr-dilations", "8,16", "--out", str(out)]) == 0
    resolved = json.loads((out / "run.json").read_text())["settings"]["resolved"]
    assert (resolved["naclip_std"], resolved["pamr_steps"], list(resolved["pamr_dilations"])) == (2.5, 3, [8, 16])
    assert main(base + ["--method", "sclip", "--naclip-std", "2.5", "--out", str(tmp_path / "bad1")]) != 0
    assert "--naclip-std" in capsys.readouterr().err
    assert main(base + ["--method", "naclip", "--no-pamr", "--pamr-steps", "3", "--out", str(tmp_path / "bad2")]) != 0
    assert "--pamr-steps" in capsys.readouterr().err
