"""SC-CLIP, PEARL and CorrCLIP against golden data from their official code (``tests/data/ovss2``).

Data-driven over ``tests/data/ovss2/index.json`` (README there): every case of a method built here
is run end to end from the image and the tiny checkpoint, through the Python API
(``preset="published"`` with the fixture's settings as overrides) and through ``tag2mask segment``;
every array of the case must match within ``tolerances.<method>.<array>``, label maps up to
``label_max_mismatch`` pixels, anomaly sets, window boxes, region maps, scopes and DBSCAN labels
exactly. CorrCLIP's DINO is the set's own (``index.json`` ``dino``), loaded from Meta's layout and
from a ``transformers`` folder converted here; its name set is the set's ``"; "`` file. Nothing
here names a case, a size or a class count: another set of this format can be dropped in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.clip.loading import load_clip
from tag2mask.io.palette import read_label_png
from tag2mask.methods.corrclip import CorrClipSegmenter, read_corrclip_names
from tag2mask.methods.ovss2 import NewerOvssSegmenter
from tag2mask.methods.ovss2.pearl import tlp_text_matrix
from tag2mask.models.dino import dino_to_hf, hf_to_dino, load_dino
from tag2mask.vocab.vocabulary import load_vocabulary

from fixture_sets import assert_close, assert_labels, load_npz

DATA = Path(__file__).parent / "data" / "ovss2"
INDEX = json.loads((DATA / "index.json").read_text())
#: fixture method keys of the methods NewerOvssSegmenter runs (the official repo names the method)
METHOD_KEYS = sorted(INDEX["methods"])
CASE_KEYS = sorted(INDEX["cases"])
# fp32 and fp64 agreed on every window, anomaly set, region map, scope entry (README section 6)
EXACT = {"win_boxes", "win_outliers", "win_region_masks", "win_scope"}
LABELS = {"label", "label_nocorr"}


def run_spec(key: str) -> tuple[str, dict]:
    """tag2mask method and ``published``-preset overrides that reproduce fixture method ``key``."""
    meta = INDEX["methods"][key]
    s = meta["settings"]
    options = {"short_side": s["short"], "logit_scale": float(s["logit_scale"]),
               "prob_threshold": float(s.get("prob_thd", 0.0)), "area_threshold": s.get("area_thd")}
    if s["crop"] > 0:
        options.update(mode="slide", crop=s["crop"], stride=s["stride"])
    else:
        options["mode"] = "whole"
    if meta["repo"] == "pearl":
        options.update(alpha_kk=float(s["alpha_kk"]), tlp_grid=int(s["grid"]))
    if meta["repo"] == "corrclip":  # no area threshold in CorrCLIP
        assert options.pop("area_threshold") is None
    return meta["repo"], options


def _names(key: str) -> list[str]:
    """The name set of fixture method ``key`` (CorrCLIP's own ``"; "`` file, README section 1)."""
    return INDEX["names_corrclip"] if INDEX["methods"][key]["repo"] == "corrclip" else INDEX["names"]


def arrays_of(image: str) -> dict[str, np.ndarray]:
    return load_npz(DATA / f"{image}.npz")


def text_arrays() -> dict[str, np.ndarray]:
    return load_npz(DATA / "text.npz")


@pytest.fixture(scope="module")
def name_files(tmp_path_factory) -> dict[str, Path]:
    """Fixture method key -> its name set written as the official file (line 1 = background)."""
    folder = tmp_path_factory.mktemp("names")
    out = {}
    for key in METHOD_KEYS:
        out[key] = folder / f"cls_{key}.txt"
        out[key].write_text("\n".join(_names(key)), encoding="utf-8")
    return out


def _vocab(key: str, path: Path):
    if INDEX["methods"][key]["repo"] == "corrclip":
        return read_corrclip_names(path)
    return load_vocabulary(str(path), first_line_background=True)


@pytest.fixture(scope="module")
def dino_files(tmp_path_factory) -> dict[str, Path]:
    """The set's tiny DINO in Meta's layout (a ``.pth`` state dict) and as a ``transformers`` ViTModel folder."""
    folder = tmp_path_factory.mktemp("dino")
    with np.load(DATA / INDEX["dino"]["file"]) as z:
        sd = {k: torch.from_numpy(z[k]) for k in z.files}
    torch.save(sd, folder / "dino_meta.pth")
    hf = folder / "dino_hf"
    hf.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dino_to_hf(sd).items()}, str(hf / "model.safetensors"))
    cfg = INDEX["dino"]
    (hf / "config.json").write_text(json.dumps({
        "model_type": "vit", "hidden_size": cfg["embed_dim"], "num_hidden_layers": cfg["depth"],
        "num_attention_heads": cfg["num_heads"], "patch_size": cfg["patch_size"], "image_size": cfg["img_size"],
        "intermediate_size": int(cfg["embed_dim"] * cfg["mlp_ratio"]), "qkv_bias": cfg["qkv_bias"]}))
    return {"meta": folder / "dino_meta.pth", "hf": hf}


@pytest.fixture(scope="module")
def segmenters(tiny_clip_path, name_files, dino_files):
    model = load_clip(tiny_clip_path)
    cache: dict[tuple[str, str], NewerOvssSegmenter] = {}

    def get(key: str, dino_layout: str = "meta") -> NewerOvssSegmenter:
        if (key, dino_layout) not in cache:
            method, options = run_spec(key)
            common = dict(preset="published", text_cache=False, device="cpu", **options)
            vocab = _vocab(key, name_files[key])
            if method == "corrclip":
                dino = load_dino(dino_files[dino_layout], num_heads=INDEX["dino"]["num_heads"])
                cache[key, dino_layout] = CorrClipSegmenter(model, vocab, dino, **common)
            else:
                cache[key, dino_layout] = NewerOvssSegmenter(model, vocab, method, **common)
        return cache[key, dino_layout]

    return get


def test_the_set_has_cases_of_every_method():
    assert {INDEX["methods"][k]["repo"] for k in METHOD_KEYS} == {"scclip", "pearl", "corrclip"}
    assert all(any(INDEX["cases"][c]["method"] == k for c in CASE_KEYS) for k in METHOD_KEYS)


@pytest.mark.parametrize("key", METHOD_KEYS)
def test_text_embeddings(segmenters, key):
    seg = segmenters(key)
    ours_words = list(seg.vocab.background) + [w for syns in seg.vocab.synonyms for w in syns]
    assert ours_words == [" ".join(w.split()) for w in INDEX["methods"][key]["query_words"]]
    assert seg.prompt_label.tolist() == INDEX["methods"][key]["query_idx"]
    assert_close("text", seg.text.numpy(), text_arrays()[f"{key}.text"], INDEX["tolerances"][key]["text"])
    if f"{key}.tlp_S" in text_arrays():  # PEARL's text matrix (TLP uses its diagonal)
        assert_close("tlp_S", tlp_text_matrix(seg.text).numpy(), text_arrays()[f"{key}.tlp_S"], 1e-6)


def test_the_dino_is_the_sets_own(dino_files):
    """Architecture and weights of the loaded DINO are those ``index.json`` describes, in both layouts."""
    cfg = INDEX["dino"]
    models = [load_dino(dino_files["meta"], num_heads=cfg["num_heads"]), load_dino(dino_files["hf"])]
    with np.load(DATA / cfg["file"]) as z:
        ref = {k: z[k] for k in z.files}
    for m in models:
        assert (m.embed_dim, len(m.blocks), m.num_heads, m.patch_size) == \
            (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"])
        assert {k: v.numpy().tolist() for k, v in m.state_dict().items()} == {k: v.tolist() for k, v in ref.items()}


def _predict(seg, case: dict, ref: dict):
    image = Image.fromarray(ref["image"])
    if isinstance(seg, CorrClipSegmenter):  # the region map the official code loaded for this image
        return seg.predict(image, keep_arrays=True, region_map=ref["region_mask"])
    return seg.predict(image, keep_arrays=True)


CORR_CASES = [c for c in CASE_KEYS if INDEX["methods"][INDEX["cases"][c]["method"]]["repo"] == "corrclip"]


@pytest.mark.parametrize("case_key", CORR_CASES)
def test_corrclip_with_a_transformers_dino_folder(segmenters, case_key):
    case = INDEX["cases"][case_key]
    key, ref = case["method"], arrays_of(case["image"])
    res = _predict(segmenters(key, "hf"), case, ref)
    assert_close("win_dino_feats", res.arrays["win_dino_feats"], ref[f"{key}.win_dino_feats"],
                  INDEX["tolerances"][key]["win_dino_feats"])
    assert_labels("label", res.label, ref[f"{key}.label"], case["label_max_mismatch"])


@pytest.mark.parametrize("case_key", CASE_KEYS)
def test_arrays_match_official(segmenters, case_key):
    case = INDEX["cases"][case_key]
    key, ref = case["method"], arrays_of(case["image"])
    tol = INDEX["tolerances"][key]
    res = _predict(segmenters(key), case, ref)
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
        elif name in LABELS:
            assert_labels(name, ours[name], ref[f"{key}.{name}"], case["label_max_mismatch"])
        else:
            assert name in tol, f"fixture array {key}.{name} has no tolerance"
            assert_close(name, ours[name], ref[f"{key}.{name}"], tol[name])
    counts = np.bincount(res.label.ravel(), minlength=len(case["label_counts"]))
    assert np.abs(counts - np.asarray(case["label_counts"])).sum() <= 2 * case["label_max_mismatch"]
    for window in case.get("dbscan", []):  # CorrCLIP: DBSCAN label of every region but the smallest id
        assert len(window["labels"]) == window["n_regions"]
        assert ours["dbscan"][window["window"]] == window["labels"]
    np.testing.assert_array_equal(res.label, ours["label"])


#: every array the cases of a method hold; test_arrays_match_official compares each of them by name
CASE_ARRAYS = {
    "scclip": ("win_boxes", "win_feats", "win_patch_logits", "logits", "probs", "label", "win_lof_scores",
               "win_outliers", "win0_mid_simi", "win0_pre_sim_thd", "win0_post_sim_thd", "win0_main", "win0_multi"),
    "pearl": ("win_boxes", "win_feats", "win_patch_logits", "logits", "probs", "label", "logits_tlp", "tlp_F_grid",
              "tlp_agree", "tlp_log_s", "tlp_w_h", "tlp_w_v", "win0_pa_R", "win0_pa_attn"),
    "corrclip": ("win_boxes", "win_feats", "win_patch_logits", "logits", "probs", "label", "label_nocorr",
                 "win_dino_feats", "win_region_masks", "win_scope"),
}
#: the tiny DINO's tensors in Meta's layout (``{i}``: each block)
DINO_TENSORS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias") + tuple(f"blocks.{{i}}.{name}.{kind}" for name in
                                     ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                                     for kind in ("weight", "bias"))


def test_every_case_array_is_one_the_comparison_knows():
    held: dict[str, set[str]] = {}
    for case in (INDEX["cases"][c] for c in CASE_KEYS):
        key = case["method"]
        names = {k.split(".", 1)[1] for k in arrays_of(case["image"]) if k.startswith(key + ".")}
        held.setdefault(INDEX["methods"][key]["repo"], set()).update(names)
    for repo, names in held.items():
        assert names <= set(CASE_ARRAYS[repo]), f"{repo}: arrays {sorted(names - set(CASE_ARRAYS[repo]))} unknown"
    # each array is held by some case of its method (a method variant may hold a subset, e.g. whole-image PEARL)
    assert {r: set(CASE_ARRAYS[r]) for r in held} == held


def test_tiny_dino_file_holds_the_whole_model():
    with np.load(DATA / INDEX["dino"]["file"]) as z:
        sd = {k: torch.from_numpy(z[k]) for k in z.files}
    blocks = INDEX["dino"]["depth"]
    expected = {n.replace("{i}", str(i)) for n in DINO_TENSORS for i in (range(blocks) if "{i}" in n else (0,))}
    assert set(sd) == expected
    assert set(hf_to_dino(dino_to_hf(sd))) == expected  # every tensor maps to the transformers layout and back


# --------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for image in INDEX["images"]:
        Image.fromarray(arrays_of(image)["image"]).save(folder / f"{image}.png")  # lossless
    return folder


@pytest.fixture(scope="module")
def region_folder(tmp_path_factory) -> Path:
    """Each image's region map as the official pre-generated file: ``<stem>.npz['instance_mask']``."""
    folder = tmp_path_factory.mktemp("regions")
    for image in INDEX["images"]:
        np.savez_compressed(folder / f"{image}.npz", instance_mask=arrays_of(image)["region_mask"])
    return folder


def _cli_args(key: str, name_file: Path, folder: Path, out: Path, weights: Path, extra: list[str]) -> list[str]:
    method, options = run_spec(key)
    argv = ["segment", str(folder), "--classes", str(name_file), "--first-line", "background", "--method", method,
            "--preset", "published", "--weights", str(weights), "--out", str(out), "--device", "cpu",
            "--save-logits", "--quiet", "--mode", options["mode"], "--short-side", str(options["short_side"]),
            "--logit-scale", repr(options["logit_scale"]), "--prob-threshold", repr(options["prob_threshold"])]
    if options["mode"] == "slide":
        argv += ["--crop", str(options["crop"]), "--stride", str(options["stride"])]
    if options.get("area_threshold") is not None:
        argv += ["--area-threshold", repr(float(options["area_threshold"]))]
    if "alpha_kk" in options:
        argv += ["--alpha-kk", repr(options["alpha_kk"]), "--tlp-grid", str(options["tlp_grid"])]
    return argv + extra


@pytest.mark.parametrize("key", METHOD_KEYS)
def test_command_reproduces_official(key, name_files, image_folder, region_folder, dino_files, tiny_clip_path,
                                     tmp_path, monkeypatch, capsys):
    from tag2mask.cli.main import main

    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    corr = INDEX["methods"][key]["repo"] == "corrclip"
    extra = ["--dino", str(dino_files["hf"]), "--regions", str(region_folder)] if corr else []
    assert main(_cli_args(key, name_files[key], image_folder, out, tiny_clip_path, extra)) == 0
    for case in (INDEX["cases"][c] for c in CASE_KEYS):
        if case["method"] != key:
            continue
        ref = arrays_of(case["image"])
        label = read_label_png(out / "masks" / f"{case['image']}.png")
        assert_labels("label", label, ref[f"{key}.label"], case["label_max_mismatch"])
        with np.load(out / "logits" / f"{case['image']}.npz") as z:
            assert_close("probs", z["probs"], ref[f"{key}.probs"], INDEX["tolerances"][key]["probs"])
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["resolved"]["round_fp16_weights"] is True
    assert record["settings"]["resolved"]["method"] == run_spec(key)[0]
    # a published CorrCLIP run with another CLIP than MetaCLIP B/16 says so
    assert any("MetaCLIP" in w for w in record["warnings"]) == corr
    assert ("MetaCLIP" in capsys.readouterr().err) == corr
