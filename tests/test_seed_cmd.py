"""``tag2mask seed``: CAM folders + proposals (files, superpixels, SAM) -> seed masks, on the batch runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.cli.main import main
from tag2mask.io.palette import read_label_png
from tag2mask.proposals.base import MaskProposals
from tag2mask.proposals.rle_files import read_proposals_json, write_proposals_json

H, W = 40, 60


def _world(tmp_path: Path, names=("a", "b", "sub/c")):
    """Images with a left and a right object; CAMs (as `tag2mask label` writes them) that point at them."""
    images, cams, props = tmp_path / "images", tmp_path / "run" / "cams", tmp_path / "props"
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        img = np.full((H, W, 3), 30, np.uint8)
        img[5:35, 5:25] = (200, 40, 40)
        img[5:35, 35:55] = (40, 40, 200)
        img = np.clip(img.astype(int) + rng.integers(0, 10, img.shape), 0, 255).astype(np.uint8)
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(images / f"{name}.{'png' if i % 2 else 'jpg'}", quality=95)
        low = np.zeros((2, 5, 6), np.float32)  # low-resolution CAMs: class 3 left, class 7 right
        low[0, 1:4, 0:3] = 1.0
        low[1, 1:4, 3:6] = 1.0
        (cams / name).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cams / f"{name}.npz", keys=np.array([3, 7]), cams=low.astype(np.float16))
        masks = np.zeros((3, H, W), bool)
        masks[0, 5:35, 5:25] = True
        masks[1, 5:35, 35:55] = True
        masks[2] = ~(masks[0] | masks[1])
        (props / name).parent.mkdir(parents=True, exist_ok=True)
        write_proposals_json(props / f"{name}.json", MaskProposals.from_masks(masks, np.array([2, 2, 1])))
    return tmp_path / "run", images, props


def _manifest(out: Path) -> dict[str, dict]:
    return {r["item"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def test_seed_from_proposal_files(tmp_path):
    run, images, props = _world(tmp_path)
    out = tmp_path / "seeds"
    assert main(["seed", str(run), "--images", str(images), "--proposals", str(props), "--out", str(out), "--quiet"]) == 0
    expected = np.zeros((H, W), np.uint8)
    expected[5:35, 5:25] = 4
    expected[5:35, 35:55] = 8
    for name in ("a", "b", "sub/c"):
        assert np.array_equal(read_label_png(out / "masks" / f"{name}.png"), expected)
    record = json.loads((out / "run.json").read_text())
    assert record["written"] == 3 and record["failed"] == 0 and record["settings"]["proposals"]["source"] == "files"
    manifest = _manifest(out)
    assert manifest["sub/c"]["classes"] == [3, 7] and manifest["sub/c"]["proposals"] == 3
    # resume: nothing is redone
    assert main(["seed", str(run / "cams"), "--images", str(images), "--proposals", str(props), "--out", str(out),
                 "--quiet", "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["skipped"] == 3


def test_bad_items_are_reported_and_nothing_is_half_written(tmp_path):
    run, images, props = _world(tmp_path, names=("a", "b", "c", "d", "e", "f"))
    (props / "b.json").write_text('[{"segmentation": {"size": [40, 60], "counts": [5, 5]}}]')  # counts too short
    (props / "c.json").unlink()
    (run / "cams" / "d.npz").write_bytes(b"not an npz")
    np.savez(run / "cams" / "e.npz", keys=np.array([3]), cams=np.zeros((2, 4, 4), np.float32))  # K mismatch
    next(images.glob("f.*")).unlink()
    out = tmp_path / "seeds"
    code = main(["seed", str(run), "--images", str(images), "--proposals", str(props), "--out", str(out), "--quiet"])
    assert code == 1
    manifest = _manifest(out)
    assert manifest["a"]["status"] == "ok"
    kinds = {k: (r.get("error_kind"), r.get("error", "")) for k, r in manifest.items() if r["status"] == "error"}
    assert kinds["b"][0] == "proposals" and str(props / "b.json") in kinds["b"][1] and "invalid RLE" in kinds["b"][1]
    assert kinds["c"][0] == "missing" and "c.json" in kinds["c"][1]
    assert kinds["d"][0] == "cams" and "d.npz" in kinds["d"][1]
    assert kinds["e"][0] == "cams" and "(K, h, w)" in kinds["e"][1]
    assert kinds["f"][0] == "missing" and "no image" in kinds["f"][1]
    written = sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*") if p.is_file())
    assert written == ["a.png"]  # failed items leave no file behind (no temporary files either)
    assert json.loads((out / "run.json").read_text())["failed"] == 5


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_seed_with_superpixels(tmp_path, method):
    pytest.importorskip("skimage")
    run, images, _ = _world(tmp_path, names=("a",))
    out = tmp_path / method
    extra = ["--n-segments", "20"] if method == "slic" else ["--scale", "200", "--min-size", "30"]
    assert main(["seed", str(run), "--images", str(images), "--proposals", method, "--out", str(out), "--quiet",
                 "--save-proposals", *extra]) == 0
    seed = read_label_png(out / "masks" / "a.png")
    assert set(np.unique(seed)) <= {0, 4, 8}
    assert (seed[10:30, 8:22] == 4).mean() > 0.8 and (seed[10:30, 38:52] == 8).mean() > 0.8
    saved = read_proposals_json(out / "proposals" / "a.json")
    assert np.array_equal(saved.masks.sum(0), np.ones((H, W)))  # a partition of the image
    # the saved proposals reproduce the seeds
    again = tmp_path / "again"
    assert main(["seed", str(run), "--images", str(images), "--proposals", str(out / "proposals"), "--out", str(again),
                 "--quiet"]) == 0
    assert np.array_equal(read_label_png(again / "masks" / "a.png"), seed)


def test_seed_with_a_tiny_sam(tmp_path):
    pytest.importorskip("transformers")
    from tiny_sam import tiny_sam

    run, images, _ = _world(tmp_path, names=("a", "b"))
    tiny_sam().save_pretrained(tmp_path / "sam")
    out = tmp_path / "sam_seeds"
    args = ["seed", str(run), "--images", str(images), "--proposals", "sam", "--sam-weights", str(tmp_path / "sam"),
            "--points-per-side", "4", "--out", str(out), "--quiet", "--save-proposals", "--device", "cpu"]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["written"] == 2
    assert record["settings"]["proposals"]["settings"]["level_overlap_thresh"] == 0.3  # the FMA preset
    assert record["settings"]["proposals"]["settings"]["points_per_side"] == 4
    for name in ("a", "b"):
        seed = read_label_png(out / "masks" / f"{name}.png")
        assert seed.shape == (H, W) and set(np.unique(seed)) <= {0, 4, 8}
        assert read_proposals_json(out / "proposals" / f"{name}.json").image_size == (H, W)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--proposals", "slic", "--sam-weights", "x"], "--sam-weights does not apply"),
        (["--proposals", "sam"], "needs --sam-weights"),
        (["--proposals", "slic", "--scale", "3"], "--scale does not apply"),
        (["--proposals", "nowhere"], "not sam, slic"),
        (["--proposals", "slic", "--alpha", "0"], "argument --alpha: expected a finite number > 0"),
    ],
)
def test_options_that_do_not_apply_are_errors(tmp_path, capsys, extra, message):
    run, images, props = _world(tmp_path, names=("a",))
    try:
        code = main(["seed", str(run), "--images", str(images), "--out", str(tmp_path / "o"), "--quiet", *extra])
    except SystemExit as exc:  # refused by the option's type, while parsing
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_files_proposals_reject_save_proposals(tmp_path, capsys):
    run, images, props = _world(tmp_path, names=("a",))
    code = main(["seed", str(run), "--images", str(images), "--proposals", str(props), "--save-proposals",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "--save-proposals does not apply" in capsys.readouterr().err
