"""``tag2mask label --method tagclip`` (no tags): TagCLIP's tags, then CLIP-ES as TagCLIP's vendored copy runs it.

Data-driven over every TagCLIP set (``tagclip_sets.py``): the cases with a ``segmentation`` record are
labelled end to end from their PNGs with no label file, and every ``seg.*`` array is compared with the
README's tolerances (section 6.2; CLIP-ES's rules for the segmentation stage). Plus the synthetic world:
masks written and predicted tags recorded without any tag given.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagclip_sets import SETS, TINY_CLIP_PATH, max_abs, rel

REPO = Path(__file__).resolve().parents[1]
SEG_SETS = [s for s in SETS if any("segmentation" in c for c in s.index["cases"])]


def _seg_cases(tagset):
    from tagclip_sets import TagCase

    return [TagCase(tagset, c) for c in tagset.index["cases"] if "segmentation" in c]


def _label(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tag2mask", "label", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=SEG_SETS, ids=[s.name for s in SEG_SETS])
def labelled(request, tmp_path_factory):
    """The set's segmentation cases labelled by ``tag2mask label`` with no --labels (one run per set)."""
    tagset = request.param
    cases = _seg_cases(tagset)
    modes = {c.entry["mode"] for c in cases}
    assert len(modes) == 1, "the segmentation stage follows one tagger mode"
    root = tmp_path_factory.mktemp("tagclip_label")
    img = root / "img"
    img.mkdir()
    for c in cases:
        shutil.copy(c.path("image"), img / Path(c.entry["image"]).name)
    out = root / "out"
    preset = tagset.preset_name(modes.pop())
    args = [str(img), "--method", "tagclip", "--classes", preset, "--weights", str(TINY_CLIP_PATH), "--device", "cpu", "--refine", "crf",
            "--save-arrays", "--out", str(out)]
    proc = _label(args)
    assert proc.returncode == 0, proc.stderr
    return tagset, cases, out, args


def test_tags_and_manifest(labelled):
    tagset, cases, out, _ = labelled
    mode = tagset.modes[cases[0].entry["mode"]]
    lines = (out / "tagclip" / "tagclip.txt").read_text().splitlines()
    assert sorted(lines) == sorted(ln for ln in mode["tag_file_lines"] if ln.split()[0] in {c.name for c in cases})
    records = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records[rec["item"]] = rec
    names = mode["class_names"]
    for c in cases:  # the predicted tags are recorded per image, and they are the official ones
        assert records[c.name]["status"] == "ok"
        assert records[c.name]["labels"] == [names[i] for i in c.cls["final"]["labels"]]
        assert records[c.name]["source"]["labels"] == c.entry["segmentation"]["label_ids"]
    run = json.loads((out / "run.json").read_text())
    assert run["tags"]["source"] == "TagCLIP" and run["tags"]["confidence_mask"] == 0.0
    assert run["settings"]["method"] == "tagclip" and run["settings"]["tags"] == "TagCLIP"


def test_segmentation_arrays(labelled):
    from tag2mask.localization.labels import cams_to_labels

    _, cases, out, _ = labelled
    for c in cases:
        z, tol, seg = c.arrays, c.tol["segmentation"], c.entry["segmentation"]
        with np.load(out / "arrays" / f"{c.name}.npz") as f:
            a = {k: f[k] for k in f.files}
        np.testing.assert_array_equal(a["keys"], z["seg.keys"])
        assert list(a["keys"]) == seg["label_ids"]
        np.testing.assert_array_equal(a["input"], z["cls.input"])  # both stages see the same input
        for k in range(len(seg["label_ids"])):
            assert max_abs(a["probs"][k], z["seg.probs"][k]) <= tol["probs"][k]
            assert max_abs(a["cam_lowres"][k], z["seg.cam_lowres"][k]) <= tol["cam_lowres"][k]
            assert rel(a["refined_lowres"][k], z["seg.refined_lowres"][k]) <= tol["refined_lowres_rel"][k]
            assert max_abs(a["attn_highres"][k], z["seg.attn_highres"][k]) <= tol["attn_highres"][k]
        assert rel(a["attn_mean8"], z["seg.attn_mean7"]) <= 1e-5  # the 7-map mean under CLIP-ES's array name
        assert rel(a["trans_mat"], z["seg.trans_mat"]) <= 1e-5
        np.testing.assert_array_equal(a["box_mask"], z["seg.box_mask"])
        assert np.mean(a["crf_label"] != z["seg.crf_label"]) <= tol["crf_label_frac"]
        assert not (a["crf_label"] == 255).any()  # no confidence mask in TagCLIP's copy
        mask = np.asarray(Image.open(out / "masks" / f"{c.name}.png"))
        np.testing.assert_array_equal(mask, a["crf_label"])
        pred = cams_to_labels(a["attn_highres"], a["keys"], bg_power=1.0)
        assert np.mean(pred != z["seg.evalcam_pred"]) <= tol["evalcam_pred_frac"]


@pytest.mark.parametrize("tagset", SEG_SETS, ids=[s.name for s in SEG_SETS])
def test_segmentation_stages_from_stored(tagset):
    """README 6.1, segmentation row: each CLIP-ES step fed the stored output of the step before, at the
    README's stage tolerances (trans <= 1e-5 rel, boxes exact, refined <= 1e-5 rel, high-res and eval labels exact)."""
    from tag2mask.localization.affinity import refine_cams, transition_matrix
    from tag2mask.localization.boxes import cam_box_masks
    from tag2mask.localization.labels import cams_to_labels
    from tag2mask.localization.scaling import scale_and_resize
    from tag2mask.methods.clip_es.pipeline import preset_for

    s = tagset.index["settings"]["segmentation"]
    config = preset_for("voc")  # what `label` runs on TagCLIP's VOC tags
    assert config.box_threshold == s["box_threshold"]
    for c in _seg_cases(tagset):
        z = c.arrays
        T = transition_matrix(torch.from_numpy(z["seg.attn_mean7"]), rounds=config.sinkhorn_rounds).numpy()
        assert rel(T, z["seg.trans_mat"]) <= 1e-5, c.name
        np.testing.assert_array_equal(cam_box_masks(z["seg.cam_lowres"], config.box_threshold), z["seg.box_mask"])
        refined = refine_cams(z["seg.trans_mat"], z["seg.cam_lowres"], z["seg.box_mask"])
        assert rel(refined, z["seg.refined_lowres"]) <= 1e-5, c.name
        high = scale_and_resize(z["seg.refined_lowres"], (c.entry["height"], c.entry["width"]))
        np.testing.assert_array_equal(high, z["seg.attn_highres"])
        pred = cams_to_labels(z["seg.attn_highres"], z["seg.keys"], bg_power=float(s["eval_bg_power"]))
        np.testing.assert_array_equal(pred, z["seg.evalcam_pred"])


def test_resume_skips_both_jobs(labelled):
    _, cases, out, args = labelled
    proc = _label([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert f"0 written, {len(cases)} already done" in proc.stdout + proc.stderr


def test_clip_es_affinity_differs_without_the_hook():
    """CLIP-ES's own affinity (blocks 5-12) leaves the fixture's 7-map mean: the hook matters."""
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.clip_es.pipeline import ClipES, preset_for
    from tag2mask.methods.tagclip.segment import affinity_blocks_5_to_11

    model = load_clip(TINY_CLIP_PATH)
    for tagset in SEG_SETS:
        c = _seg_cases(tagset)[0]
        with Image.open(c.path("image")) as im:
            image = im.convert("RGB")
        ids = c.entry["segmentation"]["label_ids"]
        official = ClipES(model, config=preset_for("voc"), text_cache_dir=False, affinity_fn=affinity_blocks_5_to_11)
        ours = official.lowres(image, ids, keep_arrays=True)[2]["attn_mean8"]
        assert rel(ours, c.arrays["seg.attn_mean7"]) <= 1e-5
        plain = ClipES(model, config=preset_for("voc"), text_cache_dir=False).lowres(image, ids, keep_arrays=True)[2]
        assert rel(plain["attn_mean8"], c.arrays["seg.attn_mean7"]) > 1e-3


def test_label_synth_images_without_tags(tmp_path):
    """A synthetic image folder, --classes synth, --method tagclip: masks written, predicted tags recorded;
    a folder without --labels is an error with CLIP-ES (no silent switch), --labels an error with tagclip."""
    from tag2mask.cli.main import main

    root = tmp_path / "S"
    assert main(["synth", "export", "--out", str(root), "--n", "2", "--val", "1", "--size", "64", "--quiet"]) == 0
    images = root / "JPEGImages"
    out = tmp_path / "out"
    proc = _label([str(images), "--classes", "synth", "--method", "tagclip", "--refine", "none", "--device", "cpu",
                   "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.stem for p in images.iterdir())
    assert sorted(p.stem for p in (out / "masks").iterdir()) == files
    tags = json.loads((out / "tagclip" / "tags.json").read_text())
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == len(files) and all(r["labels"] and r["labels"] == tags[r["image"]] for r in recs)
    bad = _label([str(images), "--classes", "synth", "--method", "tagclip", "--labels",
                  str(out / "tagclip" / "tags.json"), "--out", str(tmp_path / "o2")])
    assert bad.returncode == 2 and "--method tagclip predicts the tags" in bad.stderr
    plain = _label([str(images), "--classes", "synth", "--out", str(tmp_path / "o4")])
    assert plain.returncode == 2 and "--labels is required" in plain.stderr and not (tmp_path / "o4" / "tagclip").exists()
    split = _label([str(images), "--method", "tagclip", "--split", "val", "--out", str(tmp_path / "o5")])
    assert split.returncode == 2 and "--split" in split.stderr
    fma = _label([str(images), "--method", "fma", "--prompts", str(tmp_path), "--refine", "crf",
                  "--out", str(tmp_path / "o3")])
    assert fma.returncode == 2 and "--refine" in fma.stderr  # CLIP-ES's options stay errors with fma
