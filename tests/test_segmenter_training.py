"""Segmenter training on the engine (tag2mask.segmenter.task), with a one-convolution test double.

The networks themselves are tag2mask.models' (tested there); here: pseudo-label folders, the
augmentation, ignore=255, the teacher / self-training hooks, exact resume, torchrun, the end-of-run
evaluation and the command line.
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

from _seg_double import CLASSES, OneConv, factory, make_dataset, segmenter_config
from tag2mask.data.seg_augment import SegAugment
from tag2mask.data.segmentation import open_segmentation_data
from tag2mask.engine.loop import RunOptions, train
from tag2mask.runs.layout import read_run_checkpoint
from tag2mask.engine.logs import read_log
from tag2mask.methods.registry import segmenter_preset
from tag2mask.segmenter.task import UNLABELED, SegmenterTask, fill_unlabeled

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("segdata"))


def _source(data: Path, config):
    return open_segmentation_data(data / "images", None, data / "labels", config.num_classes)


def _run(out: Path, data: Path, config, teacher=None, kernel=3, val=False, **options) -> tuple[SegmenterTask, dict]:
    task = SegmenterTask(config, _source(data, config), _source(data, config) if val else None,
                         model_factory=factory(kernel), teacher=teacher)
    opts = dict(out_dir=str(out), device="cpu", seed=2, ckpt_every=3, log_every=1, progress=False)
    opts.update(options)
    return task, train(task, RunOptions(**opts))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_run_checkpoint(run, task="segmenter")["modules"]["model"]


def test_pseudo_label_folder_of_tag2mask_label(data):
    config = segmenter_config()
    src = _source(data, config)
    assert len(src) == 6 and [it.name for it in src.items] == [f"im{i}" for i in range(6)]
    name, rgb, mask = src.load(0)
    assert rgb.shape == (40, 48, 3) and mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 1, 2, 255}
    # the classes recorded by `tag2mask label` are found, wrong class counts are named
    from tag2mask.cli.train_segmenter import resolve_class_names

    assert resolve_class_names(None, str(data / "labels"), "folder") == list(CLASSES)
    with pytest.raises(ValueError, match="im0.png.*classes 0..1"):
        open_segmentation_data(data / "images", None, data / "labels", num_classes=2).load(0)


def test_augmentation_keeps_image_and_mask_aligned():
    # an image whose colour encodes its label: after scale / pad / crop / flip, labelled pixels keep their colour
    mask = np.zeros((60, 80), np.uint8)
    mask[:, 40:] = 1
    mask[30:, :20] = 2
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    rgb = colours[mask]
    aug = SegAugment(crop=64, scale_range=(0.5, 2.0), hflip=True)
    identity = lambda x: x  # noqa: E731 - keep the 0..1 values
    seen_pad = 0
    for pos in range(20):
        image, target = aug(rgb, mask, np.random.default_rng([0, pos]), identity)
        assert image.shape == (3, 64, 64) and target.shape == (64, 64) and target.dtype == torch.int64
        labelled = target != 255
        pad = ~labelled
        seen_pad += int(pad.sum())
        assert torch.all(image[:, pad] == 0)  # padding is the mean (0 after normalisation) and ignored
        red = image[0] > 0.5
        green = image[1] > 0.5
        agree = ((target == 1) == red) & ((target == 2) == green)
        assert agree[labelled].float().mean() > 0.95
    assert seen_pad > 0


def test_ignored_pixels_never_contribute(tmp_path, data):
    """Pixels labelled 255 in the pseudo-masks can hold anything: training is bitwise the same."""
    from PIL import Image

    from tag2mask.io.palette import read_label_png

    noisy = tmp_path / "noisy"
    (noisy / "images").mkdir(parents=True)
    (noisy / "labels").symlink_to(data / "labels")
    rng = np.random.default_rng(5)
    changed = 0
    for p in sorted((data / "images").iterdir()):
        rgb = np.array(Image.open(p))
        ignored = read_label_png(data / "labels" / "masks" / p.name) == 255
        rgb[ignored] = rng.integers(0, 255, (int(ignored.sum()), 3))
        changed += int(ignored.sum())
        Image.fromarray(rgb).save(noisy / "images" / p.name)
    assert changed > 0
    config = segmenter_config(scales=(1.0,), max_iters=4)  # a 1x1 network: no context mixes pixels
    _run(tmp_path / "a", data, config, kernel=1)
    _run(tmp_path / "b", noisy, config, kernel=1)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same noise under pixels that are labelled changes the result (so the comparison can fail)
    from tag2mask.io.palette import save_label_png

    labelled = tmp_path / "labelled"
    (labelled / "labels" / "masks").mkdir(parents=True)
    (labelled / "images").symlink_to(noisy / "images")
    (labelled / "labels" / "run.json").write_text((data / "labels" / "run.json").read_text())
    for p in sorted((data / "labels" / "masks").iterdir()):
        mask = read_label_png(p)
        save_label_png(labelled / "labels" / "masks" / p.name, np.where(mask == 255, 0, mask))
    _run(tmp_path / "c", labelled, config, kernel=1)
    wc = _weights(tmp_path / "c")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_teacher_fills_only_the_unlabelled_pixels():
    target = torch.tensor([[0, UNLABELED, 255], [2, UNLABELED, 1]])
    filled = fill_unlabeled(target, torch.full_like(target, 7))
    assert filled.tolist() == [[0, 7, 255], [2, 7, 1]]
    config = segmenter_config(unlabeled_classes=(2,))
    task = SegmenterTask(config, None, model_factory=factory())
    task.ctx = type("Ctx", (), {"autocast": staticmethod(lambda: torch.autocast("cpu", enabled=False))})()
    task.teacher = lambda images, t, it: fill_unlabeled(t, torch.ones_like(t))
    out = task._label_unlabeled(torch.zeros(1, 3, 2, 3), target[None], 0, "teacher")[0]
    assert out.tolist() == [[0, 1, 255], [2, 1, 1]]
    task.teacher = None  # no teacher: unlabelled pixels are ignored
    assert task._label_unlabeled(torch.zeros(1, 3, 2, 3), target[None], 0, "teacher")[0].tolist() == \
        [[0, 255, 255], [2, 255, 1]]


class _CountingTeacher:
    """Labels unlabelled pixels with class 1 and counts its calls (state that must survive a resume)."""

    def __init__(self) -> None:
        self.calls = torch.zeros((), dtype=torch.int64)

    def __call__(self, images, target, iteration):
        self.calls += 1
        return fill_unlabeled(target, torch.ones_like(target))

    def state_dict(self):
        return {"calls": self.calls.clone()}

    def load_state_dict(self, state):
        self.calls = state["calls"].clone()


@pytest.mark.parametrize("stop", [2, 5])  # before and after the switch to self-training at iteration 4
def test_resumed_run_equals_uninterrupted_and_the_phase_switch_survives(tmp_path, data, stop):
    config = segmenter_config(max_iters=7, scales=(0.75, 1.25), photometric=True, unlabeled_classes=(2,),
                              self_train_from=4, lr_step=2)
    t_straight = _CountingTeacher()
    _run(tmp_path / "straight", data, config, teacher=t_straight)
    _run(tmp_path / "part", data, config, teacher=_CountingTeacher(), stop_at=stop)
    t_resumed = _CountingTeacher()
    task, s = _run(tmp_path / "part", data, config, teacher=t_resumed, resume="auto")
    assert s["start_iteration"] == stop
    wa, wb = _weights(tmp_path / "straight"), _weights(tmp_path / "part")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_a, rows_b = read_log(tmp_path / "straight" / "train_log.csv"), read_log(tmp_path / "part" / "train_log.csv")
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["self_training"] for r in rows_b] == [0, 0, 0, 0, 1, 1, 1]
    assert int(t_straight.calls) == int(t_resumed.calls) == 4  # the teacher's state came back from the checkpoint


def test_lr_schedules_of_the_presets():
    clip_es = segmenter_preset("clip-es", classes=CLASSES)
    task = SegmenterTask(clip_es, None, model_factory=factory())
    params = [torch.nn.Parameter(torch.zeros(1))]
    task._optimizer = torch.optim.SGD([{"params": params, "lr": 2e-4, "initial_lr": 2e-4}], lr=2e-4)
    # deeplab-pytorch: poly 0.9 updated every 10 iterations
    assert task.lr_multiplier(0) == [1.0] and task.lr_multiplier(9) == [1.0]
    assert task.lr_multiplier(10)[0] == pytest.approx((1 - 10 / 20000) ** 0.9, rel=1e-12)
    assert task.lr_multiplier(19) == task.lr_multiplier(10)
    fs = segmenter_preset("weclip-fs", classes=CLASSES)
    task = SegmenterTask(fs, None, model_factory=factory())
    task._optimizer = torch.optim.AdamW([{"params": params, "lr": 2e-3, "initial_lr": 2e-3}], lr=2e-3)
    from tag2mask.engine.schedules.poly import poly_warmup_multiplier

    for t in (0, 49, 50, 29999):  # WeCLIP's rule (fixture-tested in test_weclip_schedule.py)
        assert task.lr_multiplier(t)[0] == poly_warmup_multiplier(t, max_iters=30000, warmup_iters=50, power=1.0)
    # an mmseg-style floor
    floor = SegmenterTask(segmenter_config(max_iters=100, lr_step=1, min_lr=1e-4, lr=1e-2, poly_power=1.0), None,
                          model_factory=factory())
    floor._optimizer = torch.optim.SGD([{"params": params, "lr": 1e-2, "initial_lr": 1e-2}], lr=1e-2)
    assert 1e-2 * floor.lr_multiplier(99)[0] == pytest.approx(1e-4 + (1e-2 - 1e-4) * 0.01)


def test_end_of_run_evaluation_matches_tag2mask_eval(tmp_path, data, capsys):
    from tag2mask.cli.main import main

    config = segmenter_config(max_iters=3)
    task, summary = _run(tmp_path / "run", data, config, val=True, val_every=3)
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert report["num_images"] == 6 and report["class_names"] == ["background", *CLASSES]
    assert summary["eval"] == report["scores"]["Mean IoU"]
    assert read_log(tmp_path / "run" / "val_log.csv")[0]["miou"] == pytest.approx(summary["eval"])
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "run" / "eval" / "masks"), "--gt", str(data / "labels" / "masks"),
                 "--classes", "voc", "--num-classes", "21", "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["scores"]["Mean IoU"] is not None
    own = json.loads(out.read_text())["scores"]
    # `tag2mask eval` over 21 VOC classes averages only the classes present: the same three
    assert own["Mean IoU"] == pytest.approx(report["scores"]["Mean IoU"])


def test_two_process_torchrun_equals_one_process(tmp_path):
    data = make_dataset(tmp_path / "data", n=8, size=(32, 36), ignore=False)  # equal labelled pixels per process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    config = segmenter_config()
    task = SegmenterTask(config, _source(data, config), None, model_factory=factory())
    train(task, RunOptions(out_dir=str(tmp_path / "one"), device="cpu", seed=2, ckpt_every=3, log_every=1,
                           progress=False))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(REPO / "tests" / "_seg_double.py"), str(data), str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_run_checkpoint(tmp_path / "two", task="segmenter")["world_size"] == 2
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    la = [r["loss"] for r in read_log(tmp_path / "one" / "train_log.csv")]
    lb = [r["loss"] for r in read_log(tmp_path / "two" / "train_log.csv")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_cli_options_that_do_not_apply_are_errors(tmp_path, data, capsys):
    from tag2mask.cli.main import main

    base = ["train", "segmenter", "--data", str(data / "images"), "--masks", str(data / "labels"), "--out",
            str(tmp_path / "run"), "--device", "cpu", "--quiet"]
    assert main(base + ["--model", "segformer", "--weights", "x.pt"]) == 2
    assert "clip-decoder only" in capsys.readouterr().err
    assert main(base + ["--preset", "clip-es", "--model", "segformer"]) == 2
    assert "drop --model" in capsys.readouterr().err
    assert main(base + ["--train-split", "train"]) == 2
    assert "image folder" in capsys.readouterr().err
    assert main(base[:2] + ["--data", str(data / "images"), "--classes", "a, b", "--out", str(tmp_path / "r2")]) == 2
    assert "mask folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r2").exists()


def test_one_conv_double_is_a_plain_network():
    m = OneConv(3)
    assert m(torch.zeros(1, 3, 8, 8)).shape == (1, 3, 8, 8)
