"""``tag2mask label --workers N`` (decoding and refinement in worker processes) writes exactly what the
serial job (``--workers 0``) writes: masks, CAMs, arrays, COCO JSON and manifest, byte for byte, for
every refinement, with bad items, downscaled images and nested names among them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

VOLATILE = ("time", "seconds", "rank", "traceback")


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))


def _corpus(root: Path) -> Path:
    rng = np.random.default_rng(11)
    images = root / "images"
    labels = {}
    for i in range(9):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        name = f"sub/im{i}.png" if i == 4 else f"im{i}.png"
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)  # flat regions with edges, like a scene
        Image.fromarray(blocks).resize((w, h), Image.NEAREST).save(images / name)
        labels[name] = [["cat", "dog"], ["person"], ["cat", "person", "car"]][i % 3]
    Image.fromarray(rng.integers(0, 255, (130, 120, 3), dtype=np.uint8)).save(images / "big.png")  # > --max-pixels
    labels["big.png"] = ["dog"]
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    labels["broken.png"] = ["cat"]
    labels["im0.png"] = ["cat", "dog"]
    labels["empty.png"] = []
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / "empty.png")
    (root / "labels.json").write_text(json.dumps(labels))
    return images


def _label(tiny_clip_path, images: Path, out: Path, refine: str, *extra: str) -> int:
    from tag2mask.cli.main import main

    return main(["label", str(images), "--labels", str(images.parent / "labels.json"), "--classes", "voc",
                 "--weights", str(tiny_clip_path), "--out", str(out), "--refine", refine, "--device", "cpu",
                 "--max-pixels", "10000", "--save-arrays", "--coco-json", "--quiet", *extra])


def _manifest(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE}
            for l in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("refine", ["crf", "pamr", "none"])
def test_workers_write_what_the_serial_job_writes(tiny_clip_path, tmp_path, refine):
    if refine == "crf":
        pytest.importorskip("pydensecrf")
    images = _corpus(tmp_path)
    serial, overlapped = tmp_path / "serial", tmp_path / "overlapped"
    assert _label(tiny_clip_path, images, serial, refine, "--workers", "0") == 1
    assert _label(tiny_clip_path, images, overlapped, refine, "--workers", "2") == 1
    records = _manifest(serial)
    assert records == _manifest(overlapped)
    by_item = {r["item"]: r for r in records}
    assert by_item["broken"]["error_kind"] == "decode" and by_item["empty"]["error_kind"] == "labels"
    assert by_item["big"]["status"] == "ok" and by_item["big"]["processed_size"] != by_item["big"]["size"]
    assert by_item["sub/im4"]["status"] == "ok"
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 10
    for rec in ok:
        assert len(rec["outputs"]) == 3  # mask, CAMs, arrays
        for rel in rec["outputs"]:
            assert (serial / rel).read_bytes() == (overlapped / rel).read_bytes(), rel
    assert (serial / "annotations.json").read_bytes() == (overlapped / "annotations.json").read_bytes()
    run = json.loads((overlapped / "run.json").read_text())
    assert run["workers"] == 2 and run["batch_size"] == 1 and run["written"] == 10 and run["failed"] == 2
    assert json.loads((serial / "run.json").read_text())["workers"] == 0


def test_resume_after_a_serial_run_with_workers(tiny_clip_path, tmp_path):
    images = _corpus(tmp_path)
    out = tmp_path / "out"
    assert _label(tiny_clip_path, images, out, "none", "--workers", "0", "--limit", "4") in (0, 1)
    assert _label(tiny_clip_path, images, out, "none", "--workers", "2", "--resume") == 1
    run = json.loads((out / "run.json").read_text())
    assert run["skipped"] == 4 and run["written"] + run["skipped"] == 10


def test_batch_size_needs_workers(tiny_clip_path, tmp_path, capsys):
    images = _corpus(tmp_path)
    assert _label(tiny_clip_path, images, tmp_path / "o", "none", "--workers", "0", "--batch-size", "4") == 2
    assert "--batch-size does not apply with --workers 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _label(tiny_clip_path, images, tmp_path / "o", "none", "--workers", "-1")


def test_batches_on_the_device_stage(tiny_clip_path, tmp_path):
    """--batch-size 4 (what a GPU gets by default): same masks as one image at a time, CAMs within float noise."""
    rng = np.random.default_rng(5)
    images = tmp_path / "same_size"
    images.mkdir()
    for i in range(6):  # one size: the encoder really runs 4 images per pass
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((64, 48)).save(images / f"s{i}.png")
    (tmp_path / "labels.json").write_text(json.dumps({f"s{i}.png": ["cat", "dog"] if i % 2 else ["person"]
                                                      for i in range(6)}))
    one, four = tmp_path / "one", tmp_path / "four"
    assert _label(tiny_clip_path, images, one, "none", "--workers", "1") == 0
    assert _label(tiny_clip_path, images, four, "none", "--workers", "1", "--batch-size", "4") == 0
    assert json.loads((four / "run.json").read_text())["batch_size"] == 4
    for rec in _manifest(one):
        with np.load(one / rec["outputs"][1]) as a, np.load(four / rec["outputs"][1]) as b:
            assert np.array_equal(a["keys"], b["keys"])
            assert float(np.abs(a["cams"].astype(np.float32) - b["cams"].astype(np.float32)).max()) <= 2e-3
