"""FMA-WSSS prompt training on the engine (tag2mask.methods.fma.train_task / fma_data) and `train fma`.

The shipped tiny CLIP on small synthetic scenes: augmentation, the stream, exact resume (bitwise on
CPU), the exported prompts, the command line and a two-process torchrun.
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

from tag2mask.cmdline.options import shipped_weights_path
from tag2mask.methods.fma.config import AugmentSettings, preset
from tag2mask.engine.loop import RunOptions
from tag2mask.runs.layout import RunFolderError, read_run_checkpoint
from tag2mask.methods.fma.data import (
    FMACrops, color_jitter, jitter_step, open_fma_data, rescale_crop_flip,
)
from tag2mask.methods.fma.train_task import FMAData, FMATask, train_fma
from tag2mask.methods.fma.prompt_run import FMATrainConfig, load_prompts
from tag2mask.engine.logs import read_log
from tag2mask.vocab.vocabulary import get_vocabulary

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # scene side: a 4 x 4 patch grid keeps the tiny CLIP fast
SMALL_AUG = dict(augment_long_side=(64, 80), augment_short_side_min=64, augment_crop=64)


def _config(task: str, **overrides) -> FMATrainConfig:
    v = get_vocabulary("synth")
    base = dict(max_iters=4, warmup_iters=1, batch_size=2, **SMALL_AUG)
    base.update(overrides)
    return FMATrainConfig.build("synth", task, v.names, [",".join(s) for s in v.synonyms], v.background, **base)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """Seed masks of the first synthetic training scenes, named as `synth export` names them."""
    from tag2mask.io.palette import save_label_png
    from tag2mask.synth import SyntheticDataset

    out = tmp_path_factory.mktemp("seeds")
    ds = SyntheticDataset("train", 6, SIZE)
    for i in range(len(ds)):
        mask = ds[i].mask.copy()
        mask[mask == 255] = 0
        save_label_png(out / f"{ds.image_id(i)}.png", mask)
    return out


def _data(seeds=None) -> FMAData:
    return FMAData("synth", "train", seeds=None if seeds is None else str(seeds), synth_n=6, synth_size=SIZE,
                   weights=str(shipped_weights_path()))


def _train(out: Path, config: FMATrainConfig, data: FMAData, **options) -> dict:
    opts = dict(out_dir=str(out), device="cpu", seed=3, ckpt_every=2, log_every=1, progress=False)
    opts.update(options)
    return train_fma(config, data, RunOptions(**opts))


# ------------------------------------------------------------------------------------------ data


def test_rescale_follows_the_official_rand_range_rule():
    settings = AugmentSettings(long_side=(288, 480), short_side_min=224, crop=224)
    rng_seed = np.random.default_rng(0)
    for h, w in ((375, 500), (500, 120), (224, 224), (1000, 1000)):
        rgb = rng_seed.integers(0, 255, (h, w, 3), dtype=np.uint8)
        seed = (np.arange(h * w).reshape(h, w) % 3).astype(np.uint8)
        for pos in range(6):
            rng = np.random.default_rng([0, pos])
            crop, seed_crop = rescale_crop_flip(rgb, seed, rng, settings)
            assert crop.shape == (224, 224, 3) and seed_crop.shape == (224, 224)
            # the draws: target long side, then the crop offsets; the scaled size follows the rule
            rng = np.random.default_rng([0, pos])
            target = 288 + int(rng.integers(480 - 288 + 1))
            ratio = max(target / max(h, w), 224 / min(h, w))
            assert min(round(ratio * h), round(ratio * w)) >= 224
            assert round(ratio * max(h, w)) == target or round(ratio * min(h, w)) == 224


def test_crops_keep_image_and_seed_aligned_and_labels_come_from_the_crop():
    # the colour of a pixel encodes its seed label: after scale / crop / flip they still agree
    mask = np.zeros((90, 120), np.uint8)
    mask[:, 60:] = 1
    mask[45:, :30] = 2
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)

    class One:
        names = ["a"]

        def __len__(self):
            return 1

        def load(self, i):
            return "a", colours[mask], [0, 1], mask

    aug = AugmentSettings(long_side=(100, 140), short_side_min=64, crop=64, color_jitter=False)
    crops = FMACrops(One(), aug, num_fg=2, seed=0, labels_from_crop=True)
    flipped_or_not, label_sets = set(), set()
    for pos in range(12):
        image, labels, seed, _ = crops[pos]
        assert image.shape == (3, 64, 64) and seed.shape == (64, 64)
        red = image[0] > image[1]  # class 1 pixels are red after normalisation too
        assert torch.equal(red, seed == 1) or (seed == 1).sum() - (red & (seed == 1)).sum() <= 64  # bicubic edges
        assert labels.tolist() == [int((seed == 1).any()), int((seed == 2).any())]
        label_sets.add(tuple(labels.tolist()))
        flipped_or_not.add(bool(seed[:, 0].eq(1).all()))
    assert len(label_sets) > 1, "crops must see different classes"
    image, labels, seed, _ = crops[3]
    again = crops[3]
    assert torch.equal(image, again[0]) and torch.equal(seed, again[2]), "a crop is a function of its position"
    image_labels = FMACrops(One(), aug, num_fg=2, seed=0, labels_from_crop=False)
    assert all(image_labels[p][1].tolist() == [1, 1] for p in range(4)), "image-level labels ignore the crop"


def test_color_jitter_keeps_uint8_and_is_off_with_probability_zero():
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(color_jitter(rgb, np.random.default_rng(0), p=0.0), rgb)
    changed = 0
    for s in range(8):
        out = color_jitter(rgb, np.random.default_rng(s))
        assert out.dtype == np.uint8 and out.shape == rgb.shape
        changed += int(not np.array_equal(out, rgb))
    assert changed >= 6
    # OpenCV's convertScaleAbs: saturating |x|, so a value pushed below 0 folds back
    x = np.array([[[10.0, 200.0, 250.0]]])
    assert jitter_step(x, "brightness", -20.0).tolist() == [[[10.0, 180.0, 230.0]]]
    assert jitter_step(x, "brightness", 20.0).tolist() == [[[30.0, 220.0, 255.0]]]
    assert jitter_step(x, "contrast", 1.2).tolist() == [[[12.0, 240.0, 255.0]]]
    grey = np.full((1, 1, 3), 120.0)
    assert jitter_step(grey, "saturation", 1.5).tolist() == grey.tolist()  # no saturation to scale
    red = np.array([[[200.0, 0.0, 0.0]]])
    # hue 0 shifted by -10 folds to +10 (orange), where a wrapping hue would turn magenta
    assert np.array_equal(jitter_step(red, "hue", -10.0), jitter_step(red, "hue", 10.0))
    assert jitter_step(red, "hue", 10.0)[0, 0, 1] > 0 and jitter_step(red, "hue", 10.0)[0, 0, 2] == 0


def test_seed_masks_are_checked(tmp_path, seeds):
    v = get_vocabulary("synth")
    with pytest.raises(FileNotFoundError, match="no seed mask for 6 of 6"):
        open_fma_data("synth", "train", v.names, seeds=tmp_path, synth_n=6, synth_size=SIZE)
    from tag2mask.io.palette import save_label_png

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in seeds.glob("*.png"):
        save_label_png(bad / p.name, np.full((SIZE, SIZE), 40, np.uint8))
    source = open_fma_data("synth", "train", v.names, seeds=bad, synth_n=6, synth_size=SIZE)
    with pytest.raises(ValueError, match="seed values \\[40\\]"):
        source.load(0)


# ------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_resumed_run_equals_uninterrupted_bitwise(tmp_path, seeds, task):
    config = _config(task, grad_accumulation=2 if task == "seg" else 1)
    data = _data(seeds if task == "seg" else None)
    _train(tmp_path / "straight", config, data)
    _train(tmp_path / "part", config, data, stop_at=2)
    summary = _train(tmp_path / "part", config, data, resume="auto")
    assert summary["start_iteration"] == 2
    a = read_run_checkpoint(tmp_path / "straight", task="fma")
    b = read_run_checkpoint(tmp_path / "part", task="fma")
    assert list(a["modules"]) == ["prompts"] and list(a["modules"]["prompts"]) == ["ctx"], "only the context is saved"
    assert torch.equal(a["modules"]["prompts"]["ctx"], b["modules"]["prompts"]["ctx"])
    rows_a = read_log(tmp_path / "straight" / "train_log.csv")
    rows_b = read_log(tmp_path / "part" / "train_log.csv")
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    keys = {"cl_loss"} if task == "cls" else {"cam_fg", "cam_bg"}
    assert keys <= set(rows_a[0]) and all(np.isfinite(r["loss"]) for r in rows_a)
    # the context moved, and the exported prompts are the final context
    config_back, ctx, meta = load_prompts(tmp_path / "straight")
    assert torch.equal(ctx, a["modules"]["prompts"]["ctx"]) and config_back.to_dict() == config.to_dict()
    assert meta["clip"]["fingerprint"]
    start = FMATask(config, data)
    from tag2mask.methods.fma.prompts import draw_context

    assert not torch.equal(ctx, draw_context(ctx.shape, config.stage.prompts.ctx_std, config.stage.prompts.seed))
    del start


def test_learning_rate_is_the_official_schedule(tmp_path):
    config = _config("cls", max_iters=6, warmup_iters=2, base_lr=0.01)
    _train(tmp_path / "run", config, _data())
    from tag2mask.engine.schedules.cosine import warmup_cosine_lr

    lrs = [r["lr"] for r in read_log(tmp_path / "run" / "train_log.csv")]
    assert lrs == pytest.approx([warmup_cosine_lr(t, base_lr=0.01, max_iters=6, warmup_iters=2, warmup_factor=0.01)
                                 for t in range(6)], rel=1e-12)
    ckpt = read_run_checkpoint(tmp_path / "run", task="fma")
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4


def test_crops_without_a_seed_class_give_a_zero_cam_loss():
    from tag2mask.methods.fma.train_task import _cam_losses

    cams = torch.randn(0, 4, 4, requires_grad=True)
    fg, bg = _cam_losses(cams, torch.zeros(0, 2, dtype=torch.long), torch.zeros(2, 64, 64, dtype=torch.long))
    assert float(fg.detach()) == 0 and float(bg.detach()) == 0
    cams = torch.randn(1, 4, 4, requires_grad=True)
    fg, bg = _cam_losses(cams, torch.tensor([[0, 3]]), torch.full((1, 64, 64), 255))
    (fg + bg).backward()
    assert float(fg.detach()) == 0 and torch.equal(cams.grad, torch.zeros_like(cams))


def test_a_seg_batch_without_any_positive_trains_on(tmp_path):
    """Crops of background only: FMAClip returns no CAM and the step contributes nothing (no NaN)."""
    from tag2mask.io.palette import save_label_png

    folder = tmp_path / "bg_seeds"
    folder.mkdir()
    for i in range(6):
        save_label_png(folder / f"train_{i:06d}.png", np.zeros((SIZE, SIZE), np.uint8))
    summary = _train(tmp_path / "run", _config("seg", max_iters=2), _data(folder))
    rows = read_log(tmp_path / "run" / "train_log.csv")
    assert summary["iterations"] == 2 and all(r["positives"] == 0 and r["loss"] == 0 for r in rows)


def test_presets_reproduce_the_official_configs():
    voc_cls, voc_seg, coco_cls, coco_seg = (preset("voc", "cls"), preset("voc", "seg"), preset("coco", "cls"),
                                            preset("coco", "seg"))
    assert (voc_cls.max_iters, voc_cls.warmup_iters, voc_cls.batch_size, voc_cls.base_lr) == (1800, 500, 16, 1e-3)
    assert voc_cls.loss_weights == (1.0, 0.0, 0.0) and voc_seg.loss_weights == (0.0, 1.0, 1.0)
    assert voc_seg.labels_from_crop and not coco_seg.labels_from_crop and not voc_cls.labels_from_crop
    assert voc_cls.augment == AugmentSettings((288, 480), 224, 224) and voc_seg.augment == voc_cls.augment
    assert coco_cls.augment.long_side == (round(224 * 1.42), round(224 * 1.42 * 5 / 3))
    assert coco_seg.augment.long_side == (round(224 * 1.42), round(224 * 1.42 * 1.67))
    assert (coco_cls.grad_accumulation, coco_seg.grad_accumulation) == (4, 8)
    assert (coco_cls.max_iters, coco_seg.max_iters, coco_cls.warmup_iters) == (20500, 75000, 1000)
    assert voc_cls.numerics == "fma" and preset("synth", "cls").numerics == "float32"
    # the lr schedule of the presets is the one the fixtures pin
    import fma_data as D

    for case in D.cases("lr_schedule"):
        # the official config the case was read from names its data set and stage: configs/<DATASET>/<stage>/cfg.py
        _, dataset, task = Path(case["config"]).parts[:3]
        stage = preset(dataset.lower(), task)
        assert (stage.max_iters, stage.warmup_iters, stage.base_lr) == (case["max_iter"], case["warm"]["warm_iters"],
                                                                      case["base_lr"])
        assert stage.warmup_factor == pytest.approx(case["warm"]["start_factor"])
        assert (stage.momentum, stage.weight_decay) == (case["momentum"], case["weight_decay"])


# ------------------------------------------------------------------------------------ command line


def test_cli_options_that_do_not_apply_are_errors(tmp_path, capsys, seeds):
    from tag2mask.cli.main import main

    base = ["train", "fma", "--data", "synth", "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet"]
    assert main(base + ["--task", "cls", "--seeds", str(seeds)]) == 2
    assert "--seeds does not apply to --task cls" in capsys.readouterr().err
    assert main(base + ["--task", "seg"]) == 2
    assert "--task seg needs --seeds" in capsys.readouterr().err
    assert main(base + ["--task", "cls", "--labels", "x.json"]) == 2
    assert "--labels does not apply" in capsys.readouterr().err
    assert main(base + ["--task", "cls", "--split", "val"]) == 2
    assert "--split does not apply" in capsys.readouterr().err
    assert main(base + ["--task", "cls", "--iters", "10", "--warmup-iters", "10"]) == 2
    assert "warmup iterations (10) < iterations (10)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_trains_exports_and_guards_the_run_folder(tmp_path, capsys):
    from tag2mask.cli.main import main

    args = ["train", "fma", "--task", "cls", "--data", "synth", "--synth-n", "4", "--synth-size", str(SIZE),
            "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet", "--iters", "2", "--warmup-iters", "1",
            "--batch-size", "2", "--ctx-seed", "7"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["iterations"] == 2 and Path(report["prompts"]).is_file()
    config, ctx, _ = load_prompts(report["prompts"])
    assert config.stage.prompts.seed == 7 and config.stage.batch_size == 2 and config.preset == "synth"
    assert main(args) == 2  # an existing run is never overwritten silently
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(RunFolderError):
        _train(tmp_path / "run", config, _data())


def test_cli_trains_on_a_synth_export_with_its_train_split(tmp_path, capsys):
    """A synth export is VOC-laid-out but has no train_aug: the default split is train, the preset synth."""
    from tag2mask.cli.main import main

    world = tmp_path / "world"
    assert main(["synth", "export", "--out", str(world), "--n", "2", "--val", "1", "--size", str(SIZE), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "fma", "--task", "cls", "--data", str(world), "--out", str(tmp_path / "run"), "--device",
                 "cpu", "--quiet", "--iters", "2", "--warmup-iters", "1", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config, _, _ = load_prompts(report["prompts"])
    assert config.preset == "synth" and report["iterations"] == 2


def test_prompts_files_are_read_safely(tmp_path):
    from tag2mask.methods.fma.prompt_run import PROMPTS_FILE

    bad = tmp_path / PROMPTS_FILE
    bad.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a tag2mask FMA prompts file"):
        load_prompts(bad)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing")


def test_two_process_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tag2mask",
           "train", "fma", "--task", "cls", "--data", "synth", "--synth-n", "4", "--synth-size", str(SIZE),
           "--out", str(out), "--device", "cpu", "--quiet", "--iters", "2", "--warmup-iters", "1", "--batch-size", "4",
           "--log-every", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = read_run_checkpoint(out, task="fma")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["iteration"] == 2
    assert list(ckpt["modules"]["prompts"]) == ["ctx"]
    rows = read_log(out / "train_log.csv")
    assert [r["iteration"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
