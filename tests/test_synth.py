"""Tests for the procedural synthetic world (tag2mask.synth) and the ``synth export`` command."""

from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.synth import (
    CLASS_NAMES,
    OBJECT_CLASSES,
    OBJECT_NAMES,
    STUFF_CLASSES,
    STUFF_NAMES,
    VOID_LABEL,
    SyntheticDataset,
    export_voc,
    generate_scene,
    generate_split,
    seed_for,
    voc_palette,
)
from tag2mask.synth.scenes import void_band


def _has_word(text: str, word: str) -> bool:
    """Whole-word match allowing a plural suffix ("stars", "crosses")."""
    return re.search(rf"\b{re.escape(word)}(e?s)?\b", text, flags=re.IGNORECASE) is not None


def test_world_lists() -> None:
    assert len(OBJECT_CLASSES) >= 10 and len(STUFF_CLASSES) >= 5
    assert [c.class_id for c in OBJECT_CLASSES] == list(range(1, len(OBJECT_CLASSES) + 1))
    assert len(set(OBJECT_NAMES)) == len(OBJECT_NAMES)
    assert len({c.rgb for c in OBJECT_CLASSES}) == len(OBJECT_CLASSES)
    assert CLASS_NAMES[0] == "background"
    for s in STUFF_CLASSES:
        assert all(_has_word(p, s.name) for p in s.phrases), s


def test_deterministic_and_seed_dependent() -> None:
    a, b, c = generate_scene(7), generate_scene(7), generate_scene(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert (a.labels, a.caption, a.stuff) == (b.labels, b.caption, b.stuff)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (224, 224, 3) and a.image.dtype == np.uint8
    assert a.mask.shape == (224, 224) and a.mask.dtype == np.uint8


@pytest.mark.parametrize("size", [224, 112, 48])
def test_labels_agree_with_mask(size: int) -> None:
    n_classes = len(OBJECT_CLASSES)
    min_px = max(4, round(40 * (size / 224) ** 2))  # generate_scene's default interior-pixel floor
    for seed in range(150):
        s = generate_scene(seed, size=size)
        ids, counts = np.unique(s.mask, return_counts=True)
        present = {int(i): int(n) for i, n in zip(ids, counts) if i not in (0, VOID_LABEL)}
        assert 1 <= len(s.labels) <= 4, seed
        assert len(set(s.labels)) == len(s.labels), seed
        assert set(present) == set(s.labels), (seed, present, s.labels)
        assert all(n >= min_px for n in present.values()), (seed, present)
        assert set(int(i) for i in ids) <= {0, VOID_LABEL, *range(1, n_classes + 1)}
        assert s.label_names == [CLASS_NAMES[i] for i in s.labels]
        assert s.stuff in STUFF_NAMES
        # first-appearance order == back-to-front order of the kept instances
        assert s.labels == list(dict.fromkeys(o.class_id for o in s.objects))
        for o in s.objects:
            assert 0.25 <= o.visible_fraction <= 1.0
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size


def test_captions_mention_every_label_and_stuff() -> None:
    captions = set()
    for seed in range(300):
        s = generate_scene(seed)
        for name in s.label_names:
            assert _has_word(s.caption, name), (s.caption, s.label_names)
        assert _has_word(s.caption, s.stuff), (s.caption, s.stuff)
        # no unlabelled class is mentioned (that would be a false caption)
        for name in OBJECT_NAMES:
            if name not in s.label_names:
                assert not _has_word(s.caption, name), (s.caption, s.label_names)
        captions.add(s.caption)
    assert len(captions) > 290  # varied


def test_void_outline_optional_and_one_pixel() -> None:
    on = generate_scene(3)
    off = generate_scene(3, void_outline=False)
    assert np.array_equal(on.image, off.image)
    assert VOID_LABEL in on.mask and VOID_LABEL not in off.mask
    keep = on.mask != VOID_LABEL
    assert np.array_equal(on.mask[keep], off.mask[keep])
    # the band is 1 px and on the lower-depth side only: here the background ring around a 3x3 object
    inst = np.zeros((5, 5), np.uint8)
    inst[1:4, 1:4] = 1
    band = void_band(inst)
    assert band.sum() == 12 and not band[1:4, 1:4].any()


def test_occlusion_drops_hidden_objects() -> None:
    # over many seeds some objects must have been dropped/partly hidden, and every kept one is >= 25 %
    fractions = [o.visible_fraction for seed in range(200) for o in generate_scene(seed).objects]
    assert min(fractions) >= 0.25
    assert any(f < 0.9 for f in fractions)


def test_splits_disjoint_and_dataset() -> None:
    assert seed_for("train", 0) != seed_for("val", 0) != seed_for("test", 0)
    seeds = {s: {seed_for(s, i) for i in range(50)} for s in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])
    with pytest.raises(ValueError):
        seed_for("train", 10_000_000)
    with pytest.raises(ValueError):
        seed_for("bogus", 0)
    ds = SyntheticDataset("val", 5, size=112)
    assert len(ds) == 5 and ds.image_id(2) == "val_000002"
    gen = list(generate_split("val", 5, size=112))
    assert np.array_equal(ds[2].image, gen[2].image) and np.array_equal(ds[-1].mask, gen[4].mask)
    with pytest.raises(IndexError):
        ds[5]
    tr = generate_split("train", 5, size=112)
    assert not any(np.array_equal(t.image, v.image) for t, v in zip(tr, gen))


def _check_voc_dir(out: Path, expected: dict[str, int], size: int) -> None:
    classes = (out / "classes.txt").read_text().split()
    assert classes == list(OBJECT_NAMES)
    labels = json.loads((out / "labels.json").read_text())
    caps = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(caps) == len(labels) == sum(expected.values())
    assert (out / "README.txt").read_text().startswith("tag2mask synthetic world")
    pal = voc_palette()
    for split, n in expected.items():
        ids = (out / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert len(ids) == n
        for image_id in ids:
            img = Image.open(out / "JPEGImages" / f"{image_id}.png")
            assert img.mode == "RGB" and img.size == (size, size)
            seg = Image.open(out / "SegmentationClass" / f"{image_id}.png")
            assert seg.mode == "P"
            got_pal = np.asarray(seg.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
            assert np.array_equal(got_pal, pal)
            mask = np.asarray(seg)
            names = labels[f"{image_id}.png"]
            ids_in_mask = {int(i) for i in np.unique(mask)} - {0, VOID_LABEL}
            assert {CLASS_NAMES[i] for i in ids_in_mask} == set(names)
            root = ET.parse(out / "Annotations" / f"{image_id}.xml").getroot()
            assert root.findtext("filename") == f"{image_id}.png"
            assert int(root.findtext("size/width")) == size
            xml_names = [o.findtext("name") for o in root.iter("object")]
            assert set(xml_names) == set(names)
            for o in root.iter("object"):
                xmin, ymin = int(o.findtext("bndbox/xmin")), int(o.findtext("bndbox/ymin"))
                xmax, ymax = int(o.findtext("bndbox/xmax")), int(o.findtext("bndbox/ymax"))
                assert 1 <= xmin <= xmax <= size and 1 <= ymin <= ymax <= size
    assert voc_palette()[1].tolist() == [128, 0, 0] and voc_palette()[255].tolist() == [224, 224, 192]


def test_export_voc_layout(tmp_path: Path) -> None:
    written = export_voc(tmp_path, {"train": 4, "val": 2}, size=96, seed=5)
    assert written["train"][0] == "train_000000" and len(written["val"]) == 2
    _check_voc_dir(tmp_path, {"train": 4, "val": 2}, 96)
    # regenerable: the exported image equals the dataset item
    ds = SyntheticDataset("train", 4, size=96, base_seed=5)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "JPEGImages" / "train_000003.png")), ds[3].image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "SegmentationClass" / "train_000003.png")), ds[3].mask)


def test_cli_synth_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tag2mask.cli import synth_cmd

    parser = argparse.ArgumentParser(prog="tag2mask")
    sub = parser.add_subparsers(dest="command")
    synth_cmd.add_parser(sub)
    out = tmp_path / "voc"
    args = parser.parse_args(["synth", "export", "--out", str(out), "--n", "3", "--val", "2",
                              "--size", "64", "--seed", "1", "--quiet"])
    assert args.func(args) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    _check_voc_dir(out, {"train": 3, "val": 2}, 64)
    # bare ``synth`` prints help and fails
    args = parser.parse_args(["synth"])
    assert args.func(args) == 2
    with pytest.raises(SystemExit) as info:  # refused by the option's type, while parsing
        parser.parse_args(["synth", "export", "--out", str(out), "--n", "-1", "--quiet"])
    assert info.value.code == 2
