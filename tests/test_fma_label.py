"""`tag2mask label --method fma`: CAMs from learned prompts (FMACams), SAMS seeds or plain CAM labels.

A synthetic export and a two-iteration prompt run with the shipped tiny CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.cmdline.options import shipped_weights_path
from tag2mask.cli.main import main
from tag2mask.io.palette import read_label_png
from tag2mask.engine.loop import RunOptions
from tag2mask.methods.fma.train_task import FMAData, train_fma
from tag2mask.methods.fma.prompt_run import FMATrainConfig, load_prompts
from tag2mask.vocab.vocabulary import get_vocabulary

SIZE = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fma_world") / "world"
    assert main(["synth", "export", "--out", str(out), "--n", "4", "--size", str(SIZE), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    v = get_vocabulary("synth")
    config = FMATrainConfig.build("synth", "cls", v.names, [",".join(s) for s in v.synonyms], v.background,
                                  max_iters=2, warmup_iters=1, batch_size=2, augment_long_side=(64, 72),
                                  augment_short_side_min=64, augment_crop=64)
    run = tmp_path_factory.mktemp("fma_prompts") / "run"
    train_fma(config, FMAData("synth", "train", synth_n=4, synth_size=SIZE, weights=str(shipped_weights_path())),
              RunOptions(out_dir=str(run), device="cpu", progress=False))
    return run


def _label(world: Path, prompts: Path, out: Path, *extra: str) -> int:
    return main(["label", str(world), "--split", "train", "--method", "fma", "--prompts", str(prompts), "--out", str(out),
                 "--device", "cpu", "--quiet", *extra])


def _cam_maker(prompts: Path):
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.fma.inference import FMACams
    from tag2mask.methods.fma.prompt_run import build_model

    config, ctx, _ = load_prompts(prompts)
    return config, FMACams(build_model(config, load_clip(shipped_weights_path()), ctx), config.stage.caa)


def test_cams_are_the_caa_output_scored_at_the_image_size(prompts):
    from tag2mask.methods.fma.config import caa_refine
    from tag2mask.methods.fma.inference import cam_scores
    from tag2mask.data.transforms import to_normalized_tensor
    from tag2mask.clip.model import CLIP_MEAN, CLIP_STD

    config, cams = _cam_maker(prompts)
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    result = cams(image, [5, 2, 5], keep_arrays=True)
    assert result.keys.tolist() == [2, 5]  # ascending, repeats dropped
    assert result.cams.shape == (2, 50, 70) and result.cams.dtype == np.float16
    assert result.refined.shape == (2, 4, 5)  # sides brought up to multiples of 16: 64 x 80
    # the same thing by hand: bicubic 80x64, FMAClip, CAA of the stage, official cam2score
    x = to_normalized_tensor(image.resize((80, 64), Image.BICUBIC), CLIP_MEAN, CLIP_STD)
    labels = torch.zeros(1, config.num_fg, dtype=torch.long)
    labels[0, [2, 5]] = 1
    with torch.no_grad():
        out = cams.model(x, labels)
    refined = caa_refine(out.attention[0], out.pos_cam, config.stage.caa)
    torch.testing.assert_close(torch.from_numpy(result.refined), refined, rtol=1e-5, atol=1e-7)
    scores = cam_scores(refined, (50, 70))
    assert np.abs(result.cams.astype(np.float32) - scores.numpy()).max() <= 1e-3
    # clamped at 0 and min-max normalised per map (up to the absolute 1e-7 in the denominator)
    assert float(scores.min()) == 0.0 and float(scores.amax(dim=(1, 2)).min()) == pytest.approx(1.0, abs=1e-4)
    assert set(result.arrays) == {"attention", "box_masks", "pos_cam", "refined", "logits"}
    with pytest.raises(ValueError, match="outside the 12 classes"):
        cams(image, [12])


def test_label_with_superpixels_is_sams_over_the_slic_proposals(tmp_path, world, prompts):
    from tag2mask.proposals.seeding import seed_from_proposals
    from tag2mask.proposals.superpixels import SuperpixelProposals, SuperpixelSettings

    out = tmp_path / "seeds"
    assert _label(world, prompts, out, "--proposals", "slic", "--n-segments", "30", "--save-proposals") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["method"] == "fma" and record["classes"] == list(get_vocabulary("synth").names)
    assert record["settings"]["alpha"] == 0.6 and record["settings"]["proposals"]["source"] == "slic"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4 and all(m["status"] == "ok" for m in manifest)
    _, cams = _cam_maker(prompts)
    source = SuperpixelProposals("slic", SuperpixelSettings(n_segments=30))
    for m in manifest:
        name = m["item"]
        image = Image.open(world / "JPEGImages" / f"{name}.png").convert("RGB")
        result = cams(image, m["source"]["labels"])
        expected = seed_from_proposals(result.refined, result.keys, source(np.asarray(image), name), 0.6).seed
        assert np.array_equal(read_label_png(out / "masks" / f"{name}.png"), expected)
        with np.load(out / "cams" / f"{name}.npz") as z:
            assert z["keys"].tolist() == result.keys.tolist() and z["cams"].shape == (len(result.keys), SIZE, SIZE)
        assert (out / "proposals" / f"{name}.json").is_file()
    # `tag2mask seed` on the written CAM scores gives (nearly) the same seeds: SAMS normalises per class
    again = tmp_path / "again"
    assert main(["seed", str(out), "--images", str(world / "JPEGImages"), "--proposals", str(out / "proposals"),
                 "--out", str(again), "--quiet"]) == 0
    agree = [np.mean(read_label_png(again / "masks" / f"{m['item']}.png") == read_label_png(out / "masks" / f"{m['item']}.png"))
             for m in manifest]
    assert min(agree) >= 0.95
    # resume: nothing to redo
    assert _label(world, prompts, out, "--proposals", "slic", "--n-segments", "30", "--save-proposals", "--resume") == 0


def test_overlapped_stages_write_what_the_serial_job_writes(tmp_path, world, prompts):
    """`--workers 1`: superpixels, seed map and writes in a worker process; the same bytes as `--workers 0`."""
    runs = {}
    for workers in ("0", "1"):
        out = runs[workers] = tmp_path / f"w{workers}"
        assert _label(world, prompts, out, "--proposals", "slic", "--n-segments", "30", "--save-arrays",
                      "--workers", workers) == 0
        assert json.loads((out / "run.json").read_text())["workers"] == int(workers)
    files = sorted(p.relative_to(runs["0"]) for p in runs["0"].rglob("*") if p.suffix in (".png", ".npz"))
    assert len(files) == 3 * 4  # mask, CAMs and arrays of each image
    for rel in files:
        assert (runs["0"] / rel).read_bytes() == (runs["1"] / rel).read_bytes(), rel


def test_sam_proposals_are_made_in_the_device_stage(tmp_path, world, prompts):
    """SAM needs the model's device: its proposals come from the compute stage, the seeding from a worker."""
    pytest.importorskip("transformers")
    from tiny_sam import tiny_sam

    from tag2mask.proposals.rle_files import read_proposals_json

    tiny_sam().save_pretrained(tmp_path / "sam")
    out = tmp_path / "sam_seeds"
    assert _label(world, prompts, out, "--proposals", "sam", "--sam-weights", str(tmp_path / "sam"),
                  "--points-per-side", "4", "--save-proposals", "--workers", "1", "--limit", "2") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["written"] == 2 and record["settings"]["proposals"]["settings"]["points_per_side"] == 4
    for png in sorted((out / "masks").glob("*.png")):
        assert read_label_png(png).shape == (SIZE, SIZE)
        assert read_proposals_json(out / "proposals" / f"{png.stem}.json").image_size == (SIZE, SIZE)


def test_label_without_proposals_is_plain_cam_labels(tmp_path, world, prompts):
    from tag2mask.localization.labels import cams_to_labels

    out = tmp_path / "cam_labels"
    assert _label(world, prompts, out, "--alpha", "2") == 0
    for png in sorted((out / "masks").glob("*.png")):
        with np.load(out / "cams" / f"{png.stem}.npz") as z:
            expected = cams_to_labels(z["cams"], z["keys"], bg_power=2.0)
        assert np.array_equal(read_label_png(png), expected)
    assert main(["eval", str(out), "--cams", "--gt", str(world / "SegmentationClass"), "--classes", "synth",
                 "--out", str(tmp_path / "eval.json"), "--quiet"]) == 0


def test_options_that_do_not_apply_are_errors(tmp_path, world, prompts, capsys):
    out = tmp_path / "x"
    assert main(["label", str(world), "--split", "train", "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "--prompts does not apply to --method clip-es" in capsys.readouterr().err
    assert _label(world, prompts, out, "--refine", "crf") == 2
    assert "--refine does not apply to --method fma" in capsys.readouterr().err
    assert _label(world, prompts, out, "--classes", "voc") == 2
    assert "--classes does not apply" in capsys.readouterr().err
    assert _label(world, prompts, out, "--proposals", "slic", "--sam-weights", "x") == 2
    assert "--sam-weights does not apply to --proposals slic" in capsys.readouterr().err
    assert _label(world, prompts, out, "--n-segments", "10") == 2
    assert "--n-segments does not apply to --proposals none" in capsys.readouterr().err
    assert main(["label", str(world), "--method", "fma", "--out", str(out)]) == 2
    assert "needs --prompts" in capsys.readouterr().err
    assert not out.exists()


def test_weights_must_be_the_clip_of_the_prompts(tmp_path, world, prompts, capsys, tiny_clip_path):
    assert _label(world, prompts, tmp_path / "x", "--weights", str(tiny_clip_path)) == 2
    assert "is not the CLIP the prompts" in capsys.readouterr().err
