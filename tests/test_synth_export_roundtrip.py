"""A `tag2mask synth export` folder is read back by the data sets and by `label`; the toy-model note.

The export writes PNGs into ``JPEGImages/``; the VOC loaders used to look only for ``<id>.jpg``.
The shipped tiny CLIP knows only the synthetic world: commands say so once when it runs on other
images, and record it in ``run.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tag2mask.cli.main import main


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "S"
    assert main(["synth", "export", "--out", str(root), "--n", "3", "--val", "2", "--size", "64", "--quiet"]) == 0
    return root


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))


def test_voc_dataset_reads_the_export(export):
    from tag2mask.data.datasets import VOCDataset, detect_dataset
    from tag2mask.data.images import load_image
    from tag2mask.synth.world import OBJECT_NAMES

    assert detect_dataset(export) == "voc"
    tags = json.loads((export / "labels.json").read_text())
    for split in ("train", "val"):
        ds = VOCDataset(export, split, OBJECT_NAMES)
        assert len(ds) == len((export / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split())
        for sample in ds:
            assert sample.image_path.is_file(), sample.image_path
            assert load_image(sample.image_path).size == (64, 64)
            assert [OBJECT_NAMES[k] for k in sample.label_ids] == tags[sample.image_path.name]
            assert sample.gt_path is not None and sample.gt_path.is_file()


def test_voc_dataset_mask_labels_and_upper_case_suffixes(export, tmp_path):
    from tag2mask.data.datasets import VOCDataset, find_image
    from tag2mask.synth.world import OBJECT_NAMES

    ds = VOCDataset(export, "val", OBJECT_NAMES, label_source="mask")
    assert all(s.label_ids and s.image_path.suffix == ".png" for s in ds)
    (tmp_path / "a.JPG").write_bytes(b"")
    (tmp_path / "b.webp").write_bytes(b"")
    assert find_image(tmp_path, "a").name == "a.JPG"
    assert find_image(tmp_path, "b").name == "b.webp"
    assert find_image(tmp_path, "missing").name == "missing.jpg"  # named in the "file not found" record


def test_missing_split_lists_the_splits_there(export):
    from tag2mask.data.datasets import VOCDataset
    from tag2mask.synth.world import OBJECT_NAMES

    with pytest.raises(FileNotFoundError, match="train_aug.*splits there: train, val"):
        VOCDataset(export, "train_aug", OBJECT_NAMES)


def test_label_reads_the_export(export, tmp_path, capsys):
    from tag2mask.io.palette import read_label_png

    out = tmp_path / "run"
    rc = main(["label", str(export), "--classes", "synth", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    ids = (export / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for name in ids:
        mask = read_label_png(out / "masks" / f"{name}.png")
        assert mask.shape == (64, 64) and mask.max() <= 12
    record = json.loads((out / "run.json").read_text())
    assert record["warnings"] == []  # synthetic images: the shipped tiny CLIP is the right model
    assert "warning" not in capsys.readouterr().err


def test_forgotten_classes_is_one_upfront_error(export, tmp_path, capsys):
    for argv in ([str(export)], [str(export), "--labels", str(export / "labels.json")]):
        out = tmp_path / "never"
        rc = main(["label", *argv, "--out", str(out), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert "(the default) does not know" in err and "--classes synth" in err
        assert not out.exists()  # nothing started, no per-image error records


def test_unknown_tags_with_explicit_classes(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / name)
    labels = tmp_path / "tags.json"
    labels.write_text(json.dumps({"a.png": ["gizmo"], "b.png": ["widget", "cat"]}))
    # every image has a name --classes does not know: one error, not one per image
    rc = main(["label", str(images), "--labels", str(labels), "--classes", "voc", "--out", str(tmp_path / "o"),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "2 of 2 images" in err and "'gizmo'" in err and "'widget'" in err
    assert "--classes with your class list" in err


def test_toy_model_warning_on_other_images(export, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in sorted((export / "JPEGImages").glob("train_*.png"))[:2]:
        shutil.copy(p, plain / p.name)
    labels = tmp_path / "tags.json"
    labels.write_text(json.dumps({p.name: ["star"] for p in plain.iterdir()}))
    out = tmp_path / "run"
    rc = main(["label", str(plain), "--labels", str(labels), "--classes", "synth", "--out", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert err.count("warning: the tiny CLIP shipped with tag2mask") == 1  # once per run, not per image
    assert "--weights ViT-B-16.pt" in err
    (note,) = json.loads((out / "run.json").read_text())["warnings"]
    assert "synthetic shapes world" in note

    seg = tmp_path / "seg"
    assert main(["segment", str(plain), "--classes", "synth", "--out", str(seg), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().err.count("warning: the tiny CLIP") == 1
    assert json.loads((seg / "run.json").read_text())["warnings"] == [note]


def test_no_toy_model_warning_with_other_weights(tmp_path, tiny_clip_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "seg"
    assert main(["segment", str(tmp_path / "x.png"), "--classes", "cat, dog", "--weights", str(tiny_clip_path),
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["warnings"] == []


def test_is_shipped_tiny_clip(tmp_path, tiny_clip_path):
    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.shipped import SHIPPED_WEIGHTS, is_shipped_tiny_clip

    assert is_shipped_tiny_clip(load_clip(SHIPPED_WEIGHTS))
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(SHIPPED_WEIGHTS, copy)
    assert is_shipped_tiny_clip(load_clip(copy, round_fp16_weights=True))  # a copy, rounded: still the toy
    assert not is_shipped_tiny_clip(load_clip(tiny_clip_path))
    assert not is_shipped_tiny_clip(object())


def test_is_synthetic_export(export, tmp_path):
    from tag2mask.synth.export import is_synthetic_export

    assert is_synthetic_export(export)
    assert is_synthetic_export(export / "JPEGImages")
    assert is_synthetic_export(next((export / "JPEGImages").iterdir()))
    assert not is_synthetic_export(tmp_path)


def test_info_without_weights_describes_the_shipped_model(capsys):
    from tag2mask.clip.shipped import SHIPPED_WEIGHTS

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"source:       {SHIPPED_WEIGHTS}" in out
    assert "note:" in out and "synthetic shapes world" in out


def test_train_weclip_reads_the_export(export, tmp_path, capsys):
    """`train weclip --data EXPORT` picks the synth recipe and the export's train/val splits by itself."""
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "weclip", "--data", str(export), "--out", str(run), "--iters", "1", "--batch-size", "1",
                 "--crop", "64", "--val-every", "1", "--device", "cpu", "--no-compat", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["val"] is not None and summary["val"]["iteration"] == 1  # the export's val split was used
    record = json.loads((run / "config.json").read_text())
    assert record["meta"]["data"] == {"data": str(export), "train_split": "train", "val_split": "val", "labels": None}
    config = record["config"]
    from tag2mask.synth import OBJECT_NAMES

    assert list(config["classes"]) == list(OBJECT_NAMES)  # the synthetic class names, not VOC's


def test_train_weclip_export_without_val(tmp_path, capsys):
    root = tmp_path / "S"
    assert main(["synth", "export", "--out", str(root), "--n", "2", "--size", "64", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "weclip", "--data", str(root), "--out", str(tmp_path / "run"), "--iters", "1",
                 "--batch-size", "1", "--crop", "64", "--val-every", "1", "--device", "cpu", "--no-compat",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val"] is None


def test_train_segmenter_reads_the_export(export, tmp_path, capsys):
    """`train segmenter --data EXPORT` trains on the export's train split with the synthetic classes and
    validates on its val split, without being told."""
    capsys.readouterr()
    assert main(["train", "segmenter", "--data", str(export), "--out", str(tmp_path / "run"),
                 "--preset", "clip-es", "--model-option", "variant=tiny", "--model-option", "aspp_channels=16",
                 "--iters", "1", "--batch-size", "2", "--crop", "32", "--device", "cpu", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = (export / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert report["train_pairs"] == len(ids)
    assert json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["num_images"] == len(
        (export / "ImageSets" / "Segmentation" / "val.txt").read_text().split())


def test_train_segmenter_classes_synth(export, tmp_path, capsys):
    """`--classes synth` names the synthetic world's classes (not one class called 'synth')."""
    from tag2mask.cli.train_segmenter import resolve_class_names
    from tag2mask.synth import OBJECT_NAMES

    assert resolve_class_names("synth", None, "voc") == list(OBJECT_NAMES)
    assert resolve_class_names(None, None, "voc", str(export)) == list(OBJECT_NAMES)
    assert resolve_class_names(None, None, "voc", str(tmp_path))[0] == "aeroplane"  # a plain VOC root
