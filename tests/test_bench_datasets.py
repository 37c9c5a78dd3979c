"""Readers of mmseg's benchmark layouts (tag2mask.bench.datasets): class counts, ignore handling,
reduce-zero-label, clear errors for incomplete layouts; each layout is written here, tiny and synthetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.bench import datasets as D
from tag2mask.methods.registry import bench_methods
from tag2mask.bench.synthetic import write_synthetic_layout
from tag2mask.vocab.vocabulary import load_vocabulary

SPECS = list(D.BENCHMARKS.values())
IDS = [s.name for s in SPECS]


def _write_layout(data: Path, spec: D.BenchmarkSpec, gts: list[np.ndarray], folder: str | None = None) -> list[str]:
    """Write ``spec``'s layout with one image per raw ground truth in ``gts``; returns the item keys."""
    root = data / (folder or spec.folders[0])
    keys = []
    for i, gt in enumerate(gts):
        key = f"aachen/aachen_{i:06d}_000019" if spec.recursive else f"2010_{i:06d}"
        keys.append(key)
        img = root / spec.image_dir / f"{key}{spec.image_suffix}"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(gt.shape + (3,), 90 + 10 * i, np.uint8)).save(img, format="PNG" if img.suffix == ".png" else "JPEG")
        ann = root / spec.gt_dir / f"{key}{spec.gt_suffix}"
        ann.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gt).save(ann)
    if spec.split_file:
        (root / spec.split_file).parent.mkdir(parents=True, exist_ok=True)
        (root / spec.split_file).write_text("\n".join(reversed(keys)) + "\n")
    return keys


def _raw_values(spec: D.BenchmarkSpec) -> np.ndarray:
    c = spec.num_classes
    return np.array([[0, 1, c - 1, c, min(c + 1, 254), 255]], dtype=np.uint8)


def _expected(raw: int, spec: D.BenchmarkSpec) -> int:
    """mmseg's rules, written out value by value."""
    if spec.reduce_zero_label:
        value = 255 if raw in (0, 255) else raw - 1
    else:
        value = raw
    return value if value < spec.num_classes else 255


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_official_name_sets_have_the_class_count(spec):
    for method in (None, *bench_methods()):
        path = D.names_file(spec, method)
        vocab = load_vocabulary(str(path), first_line_background=spec.has_background)
        assert len(vocab.names) + int(spec.has_background) == spec.num_classes, (path, len(vocab.names))
        assert bool(vocab.background) == spec.has_background


def test_clearclip_reads_its_own_name_sets_only_where_it_has_them():
    own = [s.name for s in SPECS if D.names_file(s, "clearclip") != D.names_file(s)]
    assert own == ["voc21", "object", "voc20"]
    assert D.names_file("voc21", "clearclip").read_text().splitlines()[0] == "background"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_reader_finds_items_and_applies_the_protocol(tmp_path, spec):
    raw = _raw_values(spec)
    keys = _write_layout(tmp_path, spec, [raw, np.flip(raw, 1).copy(), raw[:, :3].copy()])
    ds = D.open_benchmark(spec.name, data=tmp_path)
    assert [it.key for it in ds.items] == sorted(keys)
    assert ds.root == tmp_path / spec.folders[0]
    gt = ds.ground_truth(ds.items[0])
    assert gt.dtype == np.uint8 and gt.shape == raw.shape
    assert gt.tolist() == [[_expected(int(v), spec) for v in raw[0]]]
    assert gt.max() == 255 and int(gt[gt != 255].max()) < spec.num_classes


def test_reduce_zero_label_is_mmsegs():
    raw = np.array([0, 1, 2, 150, 254, 255], dtype=np.uint8)
    assert D.reduce_zero_label(raw).tolist() == [255, 0, 1, 149, 253, 255]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_incomplete_layout_says_what_is_missing_and_how_to_make_it(tmp_path, spec):
    raw = _raw_values(spec)
    _write_layout(tmp_path, spec, [raw, raw])
    ds = D.open_benchmark(spec, data=tmp_path)
    ds.items[1].gt.unlink()
    with pytest.raises(D.LayoutError) as err:
        D.open_benchmark(spec, data=tmp_path)
    msg = str(err.value)
    assert str(ds.items[1].gt) in msg and "1 file(s) missing" in msg
    assert spec.prepare in msg and spec.option in msg
    with pytest.raises(D.LayoutError, match="no layout at") as err:
        D.open_benchmark(spec, data=tmp_path / "elsewhere")
    assert spec.prepare in str(err.value)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.split_file], ids=[s.name for s in SPECS if s.split_file])
def test_missing_split_file_is_named(tmp_path, spec):
    _write_layout(tmp_path, spec, [_raw_values(spec)])
    (tmp_path / spec.folders[0] / spec.split_file).unlink()
    with pytest.raises(D.LayoutError, match="split file"):
        D.open_benchmark(spec, data=tmp_path)


def test_override_folder_and_all_problems_reported_together(tmp_path):
    spec = D.get_spec("ade")
    _write_layout(tmp_path / "mine", spec, [_raw_values(spec)], folder="ADE")
    ds = D.open_benchmark("ade20k", data=tmp_path, override=tmp_path / "mine" / "ADE")
    assert len(ds) == 1 and ds.spec.name == "ade"
    with pytest.raises(D.LayoutError) as err:
        D.open_benchmarks(["voc21", "city"], tmp_path, {})
    assert "VOC21" in str(err.value) and "City" in str(err.value)
    with pytest.raises(D.LayoutError, match="--data-voc21"):
        D.open_benchmark("voc21", override=tmp_path / "nope")


def test_coco_object_may_share_the_coco_stuff_folder(tmp_path):
    obj, stuff = D.get_spec("object"), D.get_spec("stuff")
    _write_layout(tmp_path, stuff, [_raw_values(stuff)], folder="coco_stuff164k")
    with pytest.raises(D.LayoutError, match="cvt_coco_object"):  # only COCO-Stuff's files: not COCO-Object
        D.open_benchmark(obj, data=tmp_path)
    _write_layout(tmp_path, obj, [_raw_values(obj)] * 2, folder="coco_stuff164k")
    ds = D.open_benchmark(obj, data=tmp_path)
    assert ds.root == tmp_path / "coco_stuff164k" and len(ds) == 2
    assert all(it.gt.name.endswith("_instanceTrainIds.png") for it in ds.items)


def test_unknown_benchmark_lists_the_names():
    with pytest.raises(ValueError, match="voc21, pc60, object, voc20, pc59, stuff, city, ade"):
        D.get_spec("kitti")
    assert D.get_spec("context59").name == "pc59" and D.get_spec("city_scapes").name == "city"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_synthetic_layouts_read_back_with_their_own_name_set(tmp_path, spec):
    names = write_synthetic_layout(tmp_path, spec, n=2, size=64)
    vocab = load_vocabulary(str(names), first_line_background=spec.has_background)
    classes = len(vocab.names) + int(spec.has_background)
    ds = D.open_benchmark(spec, data=tmp_path)
    assert len(ds) == 2
    for item in ds.items:
        gt = D.read_ground_truth(item.gt, spec, classes)
        valid = gt[gt != 255]
        assert valid.size > 0 and int(valid.max()) < classes
        if spec.has_background:  # background pixels are scored as class 0 ...
            assert 0 in valid
        else:  # ... and ignored where the benchmark has no background class
            assert (gt == 255).mean() > 0.2


def test_the_readers_are_a_shared_layer():
    """The dataset readers import no method and no command (other packages may use them freely)."""
    import subprocess
    import sys

    code = ("import sys, tag2mask.bench.datasets, tag2mask.bench.synthetic; "
            "print(sorted(m for m in sys.modules if m.startswith(('tag2mask.methods', 'tag2mask.cli', 'torch'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
