"""CLIP-ES end to end against the official golden fixtures (data-driven over index.json).

From the PNG and the tiny checkpoint only, every array must match within the per-label
tolerances of tests/data/clip_es/README.md section 6.2; the same through `tag2mask label`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).parent / "data" / "clip_es"
INDEX = json.loads((DATA / "index.json").read_text())
CASES = INDEX["images"]
IDS = [c["name"] for c in CASES]


@pytest.fixture(scope="module")
def cam_maker(tiny_clip_path):
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.clip_es import PRESETS, ClipES
    from tag2mask.vocab.vocabulary import get_vocabulary

    model = load_clip(tiny_clip_path, round_fp16_weights=True)
    model.visual.round_pos_embed_fp16 = True
    return ClipES(model, get_vocabulary("voc"), PRESETS["voc"], text_cache_dir=False)


def _check_arrays(ours: dict, ref, case: dict) -> None:
    tol = case["suggested_tolerance"]
    assert np.array_equal(ours["input"], ref["input"])
    assert np.array_equal(ours["keys"], ref["keys"])
    for k in range(len(ref["keys"])):
        assert np.abs(ours["probs"][k] - ref["probs"][k]).max() <= tol["probs"][k]
        assert np.abs(ours["cam_lowres"][k] - ref["cam_lowres"][k]).max() <= tol["cam_lowres_end_to_end"][k]
        scale = max(np.abs(ref["refined_lowres"][k]).max(), 1e-12)
        assert np.abs(ours["refined_lowres"][k] - ref["refined_lowres"][k]).max() <= max(
            tol["refined_lowres_rel_end_to_end"][k], 1e-4
        ) * scale
        diff = np.abs(ours["attn_highres"][k].astype(np.float32) - ref["attn_highres"][k].astype(np.float32))
        assert diff.max() <= tol["attn_highres_end_to_end"][k]
    for name in ("attn_mean8", "trans_mat"):
        assert np.abs(ours[name] - ref[name]).max() <= 1e-4 * np.abs(ref[name]).max()
    assert np.array_equal(ours["box_mask"], ref["box_mask"])
    assert ours["attn_highres"].dtype == np.float16


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_clip_es_arrays_match_official(cam_maker, case):
    ref = np.load(DATA / f"{case['name']}.npz")
    image = Image.open(DATA / case["image"])
    result = cam_maker(image, list(ref["keys"]), keep_arrays=True)
    _check_arrays(result.arrays, ref, case)


@pytest.mark.parametrize("vjp_mode", ["vmap", "loop"])
def test_batched_gradcam_equals_per_class_loop(cam_maker, vjp_mode):
    """All classes from one forward (vmapped or sequential VJPs) == one GradCAM call per class."""
    import torch

    from tag2mask.localization.gradcam import softmax_gradcam

    case = CASES[0]
    ref = np.load(DATA / f"{case['name']}.npz")
    keys = list(ref["keys"])
    text = torch.cat([torch.from_numpy(ref["fg_text"])[keys], torch.from_numpy(ref["bg_text"])])
    x = torch.from_numpy(ref["block11_out"])[None]
    visual = cam_maker.model.visual
    scale = cam_maker.logit_scale
    batched = softmax_gradcam(visual, x, tuple(case["grid_hw"]), text, list(range(len(keys))), scale, vjp_mode)
    for k in range(len(keys)):
        single = softmax_gradcam(visual, x, tuple(case["grid_hw"]), text, [k], scale)
        assert torch.allclose(batched.cams_raw[k], single.cams_raw[0], rtol=1e-5, atol=1e-9)


def test_label_command_reproduces_fixture(tmp_path, tiny_clip_path):
    pytest.importorskip("pydensecrf")  # the crf extra is installed in CI (.ci/run installs .[test,crf])
    from tag2mask.cli.main import main

    labels = {c["image"].split("/")[-1]: c["objects"] for c in CASES}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    out = tmp_path / "run"
    rc = main([
        "label", str(DATA / "images"), "--labels", str(tmp_path / "labels.json"), "--classes", "voc",
        "--weights", str(tiny_clip_path), "--out", str(out), "--refine", "crf", "--save-arrays",
        "--device", "cpu", "--quiet",
    ])
    assert rc == 0
    for case in CASES:
        ref = np.load(DATA / f"{case['name']}.npz")
        arrays = np.load(out / "arrays" / f"{case['name']}.npz")
        _check_arrays(arrays, ref, case)
        frac = case["suggested_tolerance"]["crf_label_frac_end_to_end"]
        assert (arrays["crf_label"] != ref["crf_label"]).mean() <= max(frac, 0.005)
        from tag2mask.io.palette import read_label_png

        assert np.array_equal(read_label_png(out / "masks" / f"{case['name']}.png"), arrays["crf_label"])
        cams = np.load(out / "cams" / f"{case['name']}.npz")
        assert cams["cams"].dtype == np.float16 and np.array_equal(cams["keys"], ref["keys"])
    record = json.loads((out / "run.json").read_text())
    assert record["written"] == len(CASES) and record["failed"] == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(l)["item"] for l in lines) == sorted(c["name"] for c in CASES)


def test_batch_equals_single_images(cam_maker):
    """Equal-size images share one encoder pass; results match one-by-one calls."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    images.append(Image.fromarray(rng.integers(0, 255, (48, 33, 3), dtype=np.uint8)))  # another size
    labels = [[14, 11], [2], [7, 8, 9], [0]]
    batched = cam_maker.batch(images, labels)
    for im, ids, res in zip(images, labels, batched):
        single = cam_maker(im, ids)
        assert np.array_equal(res.keys, single.keys)
        assert res.cams.shape == (len(ids), im.size[1], im.size[0])
        assert np.abs(res.cams.astype(np.float32) - single.cams.astype(np.float32)).max() <= 2e-3


def test_multiscale_flip_and_bf16_run(tiny_clip_path):
    """Test-time augmentation averages views at the image size; bf16 autocast stays close to fp32."""
    from dataclasses import replace

    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.clip_es import PRESETS, ClipES
    from tag2mask.vocab.vocabulary import get_vocabulary

    model = load_clip(tiny_clip_path)
    image = Image.open(DATA / CASES[0]["image"])
    ids = CASES[0]["label_ids"]
    base = ClipES(model, get_vocabulary("voc"), PRESETS["voc"], text_cache_dir=False)(image, ids)
    tta = ClipES(model, get_vocabulary("voc"), replace(PRESETS["voc"], scales=(1.0, 0.75), flip=True),
                 text_cache_dir=False)(image, ids)
    assert tta.cams.shape == base.cams.shape and tta.cams.dtype == np.float16
    assert not np.array_equal(tta.cams, base.cams)
    assert 0.0 <= float(tta.cams.min()) and float(tta.cams.max()) <= 1.0
    bf16 = ClipES(model, get_vocabulary("voc"), replace(PRESETS["voc"], precision="bf16"),
                  text_cache_dir=False)(image, ids)
    assert bf16.cams.shape == base.cams.shape
    assert np.abs(bf16.cams.astype(np.float32) - base.cams.astype(np.float32)).mean() < 0.1
