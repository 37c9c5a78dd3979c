"""Batch jobs lose nothing and keep nothing stale: changed inputs are redone on --resume, a full disk
stops the job at once with one clear line, and written files honour the umask."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))


def _image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _records(out: Path) -> dict[str, dict]:
    lines = []
    for name in ("manifest.jsonl", "manifest.rank0.jsonl"):
        if (out / name).exists():
            lines += (out / name).read_text().splitlines()
    recs: dict[str, dict] = {}
    for line in lines:
        if line.strip():
            rec = json.loads(line)
            recs[rec["item"]] = rec
    return recs


def _segment(tiny_clip_path, images: Path, out: Path, *extra: str) -> int:
    from tag2mask.cli.main import main

    return main(["segment", str(images), "--classes", "cat, dog", "--weights", str(tiny_clip_path), "--out", str(out),
                 "--mode", "whole", "--short-side", "32", "--device", "cpu", "--quiet", *extra])


def _label(tiny_clip_path, images: Path, labels: Path, out: Path, *extra: str) -> int:
    from tag2mask.cli.main import main

    return main(["label", str(images), "--labels", str(labels), "--classes", "voc", "--weights", str(tiny_clip_path),
                 "--out", str(out), "--refine", "none", "--device", "cpu", "--quiet", *extra])


# ---------------------------------------------------------------------------------------------------
# --resume and changed inputs


def test_segment_resume_redoes_a_changed_input(tiny_clip_path, tmp_path):
    from tag2mask.io.palette import read_label_png

    images = tmp_path / "in"
    for i in range(3):
        _image(images / f"img{i}.png", 24, 32, seed=i)
    out = tmp_path / "out"
    assert _segment(tiny_clip_path, images, out) == 0
    _image(images / "img1.png", 40, 20, seed=9)  # same name, new picture
    assert _segment(tiny_clip_path, images, out, "--resume") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["skipped"] == 2 and run["written"] == 1, run
    assert read_label_png(out / "masks" / "img1.png").shape == (40, 20)
    assert _records(out)["img1"]["size"] == [40, 20]
    log = [json.loads(l) for l in (out / "logs" / "rank0.log").read_text().splitlines()]
    assert any(e["event"] == "redo" and e["item"] == "img1" and "input changed" in e["reason"] for e in log)
    # nothing changed: everything is skipped
    assert _segment(tiny_clip_path, images, out, "--resume") == 0
    assert json.loads((out / "run.json").read_text())["skipped"] == 3


def test_label_resume_redoes_changed_images_and_labels(tiny_clip_path, tmp_path):
    images = tmp_path / "images"
    for name in ("a", "b", "c"):
        _image(images / f"{name}.png", 16, 16, seed=ord(name))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a.png": ["cat"], "b.png": ["dog"], "c.png": ["cat"]}))
    out = tmp_path / "out"
    assert _label(tiny_clip_path, images, labels, out) == 0
    _image(images / "a.png", 20, 12, seed=99)  # a new picture under the old name
    labels.write_text(json.dumps({"a.png": ["cat"], "b.png": ["dog", "cat"], "c.png": ["cat"]}))  # b's tags edited
    assert _label(tiny_clip_path, images, labels, out, "--resume") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["skipped"] == 1 and run["written"] == 2, run
    recs = _records(out)
    assert recs["a"]["size"] == [20, 12] and recs["b"]["labels"] == ["dog", "cat"]


# ---------------------------------------------------------------------------------------------------
# a full disk


def _fill_disk_after(monkeypatch, n_masks: int) -> list[str]:
    """From the (n_masks+1)-th mask on, fsync reports ENOSPC, as a full disk does."""
    import tag2mask.io.atomic as atomic

    real = atomic._fsync_file
    seen: list[str] = []

    def fsync(path):
        if "masks" in Path(path).parts:
            seen.append(str(path))
            if len(seen) > n_masks:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(atomic, "_fsync_file", fsync)
    return seen


def test_disk_full_stops_segment_with_one_line_then_resume(tiny_clip_path, tmp_path, monkeypatch, capsys):
    images = tmp_path / "in"
    for i in range(5):
        _image(images / f"img{i}.png", 16, 16, seed=i)
    out = tmp_path / "out"
    seen = _fill_disk_after(monkeypatch, 2)
    assert _segment(tiny_clip_path, images, out) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1, err
    assert "no space left" in err[0] and str(out / "masks" / "img2.png") in err[0] and "--resume" in err[0]
    assert len(seen) == 3, "the job went on after the first failed write"
    recs = _records(out)
    assert sorted(recs) == ["img0", "img1"] and all(r["status"] == "ok" for r in recs.values())
    assert not [p for p in (out / "masks").iterdir() if ".tmp" in p.name], "a temporary file was left behind"
    monkeypatch.undo()
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    assert _segment(tiny_clip_path, images, out, "--resume") == 0
    run = json.loads((out / "run.json").read_text())
    assert run["skipped"] == 2 and run["written"] == 3 and run["failed"] == 0


def test_disk_full_while_recording_stops_label(tiny_clip_path, tmp_path, monkeypatch, capsys):
    from tag2mask.io.manifest import RunManifest

    images = tmp_path / "images"
    for name in ("a", "b", "c"):
        _image(images / f"{name}.png", 16, 16, seed=ord(name))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a.png": ["cat"], "b.png": ["dog"], "c.png": ["cat"]}))
    real = RunManifest.record
    calls = []

    def record(self, item, status, *args, **kwargs):
        calls.append(item)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, item, status, *args, **kwargs)

    monkeypatch.setattr(RunManifest, "record", record)
    out = tmp_path / "out"
    assert _label(tiny_clip_path, images, labels, out) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "no space left" in err[0] and "manifest.rank0.jsonl" in err[0] and "--resume" in err[0]
    assert len(calls) == 2


def test_other_os_errors_are_still_per_item(tmp_path):
    from tag2mask.jobs.runner import run_items

    def process(item):
        if item == "b":
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "b"))
        path = tmp_path / "o" / f"{item}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(item)
        return [path]

    summary = run_items(["a", "b", "c"], process, tmp_path / "o", {})
    assert summary.failed == 1 and summary.written == 2


# ---------------------------------------------------------------------------------------------------
# the umask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    from tag2mask.io.atomic import atomic_path, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "sub" / "b.png") as tmp:
            Image.new("L", (2, 2)).save(tmp)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask
    assert _mode(tmp_path / "sub" / "b.png") == 0o666 & ~umask


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_safetensors_writes_honour_the_umask(tmp_path, umask):
    """safetensors' ``save_file`` replaces its file with one of mode 0600 whatever the umask: weights written
    through ``atomic_path`` (segmenter weights, the tiny CLIP, hub folders) still get the umask's mode."""
    import torch
    from safetensors.torch import save_file

    from tag2mask.io.atomic import atomic_path, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "w.safetensors") == 0o666 & ~umask


def test_segment_outputs_honour_the_umask(tiny_clip_path, tmp_path):
    images = tmp_path / "in"
    _image(images / "x.png", 16, 16, seed=0)
    out = tmp_path / "out"
    old = os.umask(0o002)  # a group-shared project folder
    try:
        assert _segment(tiny_clip_path, images, out, "--overlay", "--save-logits") == 0
    finally:
        os.umask(old)
    for path in (out / "masks" / "x.png", out / "overlays" / "x.png", out / "logits" / "x.npz", out / "run.json",
                 out / "manifest.jsonl", out / "settings.json"):
        assert _mode(path) == 0o664, (path, oct(_mode(path)))


def test_enospc_from_write_names_the_destination(tmp_path, monkeypatch):
    from tag2mask.io.atomic import atomic_path

    with pytest.raises(OSError) as info:
        with atomic_path(tmp_path / "mask.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "mask.png") and "mask.png" in str(info.value)
    assert list(tmp_path.iterdir()) == []
