"""CLIP-ZSS on the training engine and from the command line (tiny SegFormer student, shipped tiny CLIP).

A resumed run equals an uninterrupted one (student, synthesizer, CLS bank); unseen class names are
never embedded while training; the trained student segments without any CLIP image-tower module
(forward hooks, and none is even built); ``train clip-zss`` -> ``segment --checkpoint --classes`` ->
``eval --unseen SPLIT``; a renamed / reordered class set (cross-dataset use) gives the same masks
relabelled; options that do not apply are errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.clip.shipped import tiny_clip_path
from tag2mask.data.segmentation import open_segmentation_data
from tag2mask.methods.clip_zss.config import ClipZssConfig
from tag2mask.vocab.zero_shot_splits import get_split
from tag2mask.methods.clip_zss.train_task import ClipZssTask
from tag2mask.engine.loop import RunOptions, train
from tag2mask.runs.layout import read_run_checkpoint
from tag2mask.methods.registry import segmenter_preset

SPLIT = get_split("synth-9-3")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from tag2mask.synth.export import export_voc

    root = tmp_path_factory.mktemp("zss_synth")
    export_voc(root, {"train": 6, "val": 3}, size=64)
    return root


def _configs(iters: int = 4, **zss):
    seg = segmenter_preset(None, model="segformer", model_options={"variant": "tiny"}, classes=SPLIT.foreground,
                           crop_size=64, scale_range=(0.75, 1.25), photometric=True, batch_size=2, max_iters=iters,
                           optimizer="adamw", lr=1e-3, weight_decay=0.01, head_lr_mult=2.0, lr_step=1,
                           warmup_iters=1, test_mode="whole")
    options = dict(split=SPLIT.name, unseen=SPLIT.unseen, background="class", glm_bank_size=3, synth_heads=4,
                   max_regions=3)
    options.update(zss)
    return seg, ClipZssConfig(**options)


def _task(synth: Path, seg, zss, val: bool = False) -> ClipZssTask:
    train_src = open_segmentation_data(synth, "train", None, seg.num_classes)
    val_src = open_segmentation_data(synth, "val", None, seg.num_classes) if val else None
    return ClipZssTask(seg, zss, train_src, val_src, clip_weights=str(tiny_clip_path()), evaluate_at_end=val)


def _run(out: Path, synth: Path, iters: int = 4, val: bool = False, **options):
    seg, zss = _configs(iters)
    task = _task(synth, seg, zss, val)
    opts = dict(out_dir=str(out), device="cpu", seed=3, ckpt_every=2, log_every=1, progress=False)
    opts.update(options)
    return task, train(task, RunOptions(**opts))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth) -> Path:
    out = tmp_path_factory.mktemp("zss_run") / "run"
    _run(out, synth, iters=4, val=True)
    return out


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, synth):
    _run(tmp_path / "straight", synth)
    _run(tmp_path / "part", synth, stop_at=2)
    _, summary = _run(tmp_path / "part", synth, resume="auto")
    assert summary["start_iteration"] == 2
    a, b = read_run_checkpoint(tmp_path / "straight"), read_run_checkpoint(tmp_path / "part")
    assert a["iteration"] == b["iteration"] == 4
    assert set(a["modules"]) == {"model", "synthesizer"}
    for part in ("model", "synthesizer"):
        assert all(torch.equal(a["modules"][part][k], b["modules"][part][k]) for k in a["modules"][part])
    bank_a, bank_b = a["extra"]["bank"]["items"], b["extra"]["bank"]["items"]
    assert bank_a.shape == (3, 128) and torch.equal(bank_a, bank_b)  # 4 iterations x 2 crops, the newest 3
    from tag2mask.engine.logs import read_log

    rows_a = read_log(tmp_path / "straight" / "train_log.csv")
    rows_b = read_log(tmp_path / "part" / "train_log.csv")
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert {"glm", "bce", "nel_focal", "nel_dice", "ce", "pseudo_regions"} <= set(rows_a[-1])


def test_unseen_names_are_never_embedded_while_training(tmp_path, synth, monkeypatch):
    import tag2mask.clip.text_embed as text_embed

    seen_sentences: list[str] = []
    real = text_embed.tokenize

    def spy(texts, *a, **k):
        seen_sentences.extend([texts] if isinstance(texts, str) else list(texts))
        return real(texts, *a, **k)

    monkeypatch.setattr(text_embed, "tokenize", spy)
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))  # no cached embeddings: every name is encoded
    seg, zss = _configs(2)
    task = _task(synth, seg, zss)
    finished_at: list[int] = []
    real_finish = task.finish
    task.finish = lambda summary: (finished_at.append(len(seen_sentences)), real_finish(summary))  # type: ignore
    train(task, RunOptions(out_dir=str(tmp_path / "r"), device="cpu", ckpt_every=2, progress=False))
    during = " | ".join(seen_sentences[: finished_at[0]])
    assert all(name in during for name in SPLIT.seen)
    assert not any(name in during for name in SPLIT.unseen), during
    # only the export after the last iteration embeds every class (the student's test-time vocabulary)
    after = " | ".join(seen_sentences[finished_at[0]:])
    assert all(name in after for name in SPLIT.unseen)
    # the checkpointed student holds the seen embeddings only (plus its learned background)
    ckpt = read_run_checkpoint(tmp_path / "r")
    assert ckpt["modules"]["model"]["classifier.text"].shape[0] == len(SPLIT.seen)
    assert ckpt["meta"]["class_names"] == ["background", *SPLIT.seen]


def test_end_of_run_scores_seen_and_unseen_and_exports_the_student(trained):
    report = json.loads((trained / "eval" / "eval.json").read_text())
    su = report["seen_unseen"]
    assert set(su) == {"mIoU_seen", "mIoU_unseen", "hIoU"}
    assert report["unseen_ids"] == [SPLIT.class_names.index(n) for n in SPLIT.unseen]
    assert len(list((trained / "eval" / "masks").glob("*.png"))) == 3
    from tag2mask.models import load_segmenter, read_segmenter_header

    model = load_segmenter(trained / "model.safetensors")
    _, metadata = read_segmenter_header(trained / "model.safetensors")
    assert model.text_classifier.text.shape[0] == len(SPLIT.foreground)  # every class, seen and unseen
    assert json.loads(metadata["class_names"]) == list(SPLIT.class_names)


def test_inference_runs_no_clip_image_tower_module(trained, monkeypatch, tmp_path):
    from tag2mask.clip import vision
    from tag2mask.clip.resnet import ModifiedResNet
    from tag2mask.methods.clip_zss.inference import ZeroShotStudent

    built = []
    real_init = vision.VisionTransformer.__init__

    def counting_init(self, *a, **k):
        built.append(self)
        real_init(self, *a, **k)

    monkeypatch.setattr(vision.VisionTransformer, "__init__", counting_init)
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))  # no cached embeddings: the text tower runs
    ran: list[torch.nn.Module] = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: ran.append(m))
    try:
        student = ZeroShotStudent(trained, device="cpu", classes=["star", "heart", "bolt"])
        rgb = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
        label, probs = student.predict(rgb)
    finally:
        handle.remove()
    assert label.shape == (64, 80) and probs.shape == (4, 64, 80)
    assert student.class_names == ("background", "star", "heart", "bolt")
    assert not built, "a CLIP image tower was built"
    visual_kinds = (vision.VisionTransformer, ModifiedResNet)
    assert not any(isinstance(m, visual_kinds) for m in ran)
    text_modules = {id(m) for m in student.text_model().modules()}
    student_modules = {id(m) for m in student.model.modules()}
    assert all(id(m) in text_modules or id(m) in student_modules for m in ran)
    assert any(id(m) in student_modules for m in ran) and any(id(m) in text_modules for m in ran)


def test_command_line_train_segment_eval_and_renamed_classes(tmp_path, synth, capsys):
    from tag2mask.cli.main import main
    from tag2mask.io.palette import read_label_png

    run = tmp_path / "run"
    rc = main(["train", "clip-zss", "--data", str(synth), "--split", "synth-9-3", "--out", str(run),
               "--model-option", "variant=tiny", "--iters", "2", "--batch-size", "2", "--crop", "64",
               "--zss-option", "synth_heads=4", "--zss-option", "glm_bank_size=4", "--device", "cpu", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "hIoU" in out and json.loads(out.strip().splitlines()[-1])["unseen"] == list(SPLIT.unseen)
    # segment with the run's own classes (default: all of its data set's classes)
    images = synth / "JPEGImages"
    val = sorted(images.glob("val_*"))
    folder = tmp_path / "val_images"
    folder.mkdir()
    for p in val:
        (folder / p.name).write_bytes(p.read_bytes())
    assert main(["segment", str(folder), "--checkpoint", str(run), "--out", str(tmp_path / "seg"), "--quiet"]) == 0
    record = json.loads((tmp_path / "seg" / "run.json").read_text())
    assert record["class_names"] == list(SPLIT.class_names)
    rc = main(["eval", str(tmp_path / "seg" / "masks"), "--gt", str(synth / "SegmentationClass"), "--classes", "synth",
               "--unseen", "synth-9-3", "--quiet"])
    assert rc == 0
    report = json.loads((tmp_path / "seg" / "masks" / "eval.json").read_text())
    assert report["unseen_ids"] == [2, 4, 11] and "hIoU" in report["seen_unseen"]["IoU"]
    # the same student with another label set: reordered names (a 'new dataset' of three classes)
    renamed = ["hexagon", "star", "ring"]
    assert main(["segment", str(folder), "--checkpoint", str(run), "--classes", ", ".join(renamed), "--out",
                 str(tmp_path / "seg2"), "--quiet"]) == 0
    record2 = json.loads((tmp_path / "seg2" / "run.json").read_text())
    assert record2["class_names"] == ["background", *renamed]
    from tag2mask.methods.clip_zss.inference import ZeroShotStudent

    full = ZeroShotStudent(run, device="cpu")
    part = ZeroShotStudent(run, device="cpu", classes=renamed)
    for p in val:
        from tag2mask.data.images import load_image_array

        rgb = load_image_array(p)
        _, probs_full = full.predict(rgb)
        keep = [0] + [SPLIT.class_names.index(n) for n in renamed]
        expected = probs_full[keep].argmax(0)  # the cosine logits of a class do not depend on the others
        assert np.array_equal(read_label_png(tmp_path / "seg2" / "masks" / f"{p.stem}.png"), expected)
        assert np.array_equal(part.predict(rgb)[0], expected)
    # ... scored against that data set's own labels (the synth masks relabelled to the new set)
    gt2 = tmp_path / "gt2"
    gt2.mkdir()
    lut = np.zeros(256, np.uint8)
    lut[255] = 255
    for k, name in enumerate(renamed, start=1):
        lut[SPLIT.class_names.index(name)] = k
    from tag2mask.io.palette import save_label_png

    for p in val:
        save_label_png(gt2 / f"{p.stem}.png", lut[read_label_png(synth / "SegmentationClass" / f"{p.stem}.png")])
    assert main(["eval", str(tmp_path / "seg2" / "masks"), "--gt", str(gt2), "--classes", ", ".join(renamed),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "seg2" / "masks" / "eval.json").read_text())["class_names"] == record2["class_names"]


def test_options_that_do_not_apply_are_errors(tmp_path, synth, trained, capsys):
    from tag2mask.cli.main import main

    base = ["train", "clip-zss", "--data", str(synth), "--out", str(tmp_path / "x"), "--device", "cpu"]
    assert main(base + ["--split", "synth-9-3", "--classes", "synth", "--unseen", "ring"]) == 2
    assert "come from --split" in capsys.readouterr().err
    assert main(base + ["--classes", "synth"]) == 2
    assert "--unseen" in capsys.readouterr().err
    assert main(base + ["--classes", "synth", "--unseen", "unicorn"]) == 2
    assert "unicorn" in capsys.readouterr().err
    assert main(base + ["--split", "synth-9-3", "--zss-option", "unseen=[]"]) == 2
    assert "use --unseen" in capsys.readouterr().err
    assert main(base + ["--split", "synth-9-3", "--zss-option", "no_such_thing=1"]) == 2
    assert "no_such_thing" in capsys.readouterr().err
    seg = ["segment", str(synth / "JPEGImages"), "--checkpoint", str(trained), "--out", str(tmp_path / "s")]
    assert main(seg + ["--crf"]) == 2
    assert "--crf" in capsys.readouterr().err
    assert main(seg + ["--classes", "cat, dog|puppy"]) == 2
    assert "plain class names" in capsys.readouterr().err
    assert main(seg + ["--method", "sclip"]) == 2
    assert "--method" in capsys.readouterr().err


def test_frozen_clip_decoder_student_trains_and_segments_new_names(tmp_path, synth):
    """The second kind of student: WeCLIP's decoder over a frozen CLIP (its backbone never learns)."""
    from tag2mask.methods.clip_zss.inference import ZeroShotStudent

    seg, zss = _configs(2)
    seg = type(seg).from_dict({**seg.to_dict(), "model": "clip-decoder", "model_options": {}})
    task = _task(synth, seg, zss)
    train(task, RunOptions(out_dir=str(tmp_path / "r"), device="cpu", seed=3, ckpt_every=2, progress=False))
    backbone = [(n, p) for n, p in task.model.named_parameters() if n.startswith(tuple(task.model.frozen_prefixes()))]
    assert backbone and all(not p.requires_grad and p.grad is None for _, p in backbone)
    ckpt = read_run_checkpoint(tmp_path / "r")
    assert ckpt["task"] == "clip-zss"
    assert not any(k.startswith(tuple(task.model.frozen_prefixes())) for k in ckpt["modules"]["model"])
    student = ZeroShotStudent(tmp_path / "r", device="cpu", classes=["heart", "star"])
    label, probs = student.predict((np.random.default_rng(1).random((48, 56, 3)) * 255).astype(np.uint8))
    assert label.shape == (48, 56) and probs.shape == (3, 48, 56) and label.max() <= 2
