"""End-to-end tests of ``tag2mask segment`` with the tiny CLIP."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from tag2mask.cli import segment_cmd
from tag2mask.io.palette import read_label_png


@pytest.fixture()
def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tag2mask")
    segment_cmd.add_parser(root.add_subparsers(dest="command"))
    return root


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))


def _write_images(folder, sizes=((333, 250), (120, 200))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _args(parser, *argv):
    return parser.parse_args(["segment", *argv])


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def test_end_to_end_folder(parser, tiny_clip_path, tmp_path):
    images = _write_images(tmp_path / "in")
    out = tmp_path / "out"
    args = _args(parser, str(images), "--classes", "cat, dog; background: sky, grass, wall", "--weights",
                 str(tiny_clip_path), "--out", str(out), "--overlay", "--save-logits", "--quiet",
                 "--method", "sclip", "--prob-threshold", "0.1")
    assert segment_cmd.run(args) == 0
    for stem, (w, h) in (("img0", (333, 250)), ("img1", (120, 200))):
        mask = read_label_png(out / "masks" / f"{stem}.png")
        assert mask.shape == (h, w) and mask.max() <= 2
        with Image.open(out / "masks" / f"{stem}.png") as im:
            assert im.mode == "P"
        with Image.open(out / "overlays" / f"{stem}.png") as im:
            assert im.mode == "RGB" and im.size[0] == w and im.size[1] >= h
        with np.load(out / "logits" / f"{stem}.npz") as z:
            assert z["logits"].shape == (3, h, w) and z["logits"].dtype == np.float32
            assert list(z["class_names"]) == ["background", "cat", "dog"]
    record = json.loads((out / "run.json").read_text())
    assert record["failed"] == 0 and record["written"] == 2
    assert record["class_names"] == ["background", "cat", "dog"]
    assert record["settings"]["method"] == "sclip"
    assert all(r["status"] == "ok" for r in record["images"])
    assert record["images"][0]["outputs"]["mask"] == str(out / "masks" / "img0.png")
    # every image exactly once in the manifest, with its verified outputs
    lines = _manifest(out)
    assert sorted(r["item"] for r in lines) == ["img0", "img1"] and all(r["status"] == "ok" for r in lines)
    for r in lines:
        stem = r["item"]
        assert sorted(r["outputs"]) == [f"logits/{stem}.npz", f"masks/{stem}.png", f"overlays/{stem}.png"]


def test_resume_redoes_only_missing_outputs(parser, tiny_clip_path, tmp_path, capsys):
    images = _write_images(tmp_path / "in", sizes=((64, 48), (40, 56), (50, 50)))
    out = tmp_path / "out"
    argv = [str(images), "--classes", "cat, dog", "--weights", str(tiny_clip_path), "--out", str(out),
            "--mode", "whole", "--quiet"]
    assert segment_cmd.run(_args(parser, *argv)) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    assert segment_cmd.run(_args(parser, *argv, "--resume")) == 0
    record = json.loads((out / "run.json").read_text())
    assert (record["written"], record["skipped"], record["failed"]) == (0, 3, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == first
    (out / "masks" / "img1.png").unlink()
    assert segment_cmd.run(_args(parser, *argv, "--resume")) == 0
    record = json.loads((out / "run.json").read_text())
    assert (record["written"], record["skipped"], record["failed"]) == (1, 2, 0)
    assert (out / "masks" / "img1.png").exists()
    assert sorted(r["item"] for r in _manifest(out)) == ["img0", "img1", "img2"]
    assert len(record["images"]) == 3 and all(r["status"] == "ok" for r in record["images"])
    redo = [json.loads(x) for x in (out / "logs" / "rank0.log").read_text().splitlines()]
    assert [e["item"] for e in redo if e["event"] == "redo"] == ["img1"]


def test_settings_guard_and_limit(parser, tiny_clip_path, tmp_path):
    images = _write_images(tmp_path / "in", sizes=((48, 48), (40, 40)))
    out = tmp_path / "out"
    argv = [str(images), "--classes", "cat, dog", "--weights", str(tiny_clip_path), "--out", str(out),
            "--mode", "whole", "--quiet"]
    assert segment_cmd.run(_args(parser, *argv, "--method", "sclip", "--limit", "1")) == 0
    assert [r["item"] for r in _manifest(out)] == ["img0"]
    with pytest.raises(ValueError, match="different settings.*method.*--overwrite"):
        segment_cmd.run(_args(parser, *argv, "--method", "maskclip", "--resume"))
    assert json.loads((out / "settings.json").read_text())["method"] == "sclip"
    assert segment_cmd.run(_args(parser, *argv, "--method", "maskclip", "--overwrite")) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["method"] == "maskclip" and record["written"] == 2
    assert sorted(r["item"] for r in _manifest(out)) == ["img0", "img1"]


def test_single_image_whole_mode_without_background(parser, tiny_clip_path, tmp_path):
    images = _write_images(tmp_path / "in", sizes=((97, 61),))
    out = tmp_path / "out"
    args = _args(parser, str(images / "img0.png"), "--classes", "cat, dog", "--weights", str(tiny_clip_path),
                 "--out", str(out), "--mode", "whole", "--method", "maskclip", "--compat", "--overlay", "--quiet")
    assert segment_cmd.run(args) == 0
    mask = read_label_png(out / "masks" / "img0.png")
    assert mask.shape == (61, 97) and mask.max() <= 1  # labels are class indices 0..K-1
    assert not (out / "logits").exists()


def test_unreadable_image_is_reported_and_skipped(parser, tiny_clip_path, tmp_path, capsys):
    images = _write_images(tmp_path / "in")
    (images / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = (images / "img0.png").read_bytes()
    (images / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    (images / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    args = _args(parser, str(images), "--classes", "cat, dog", "--weights", str(tiny_clip_path), "--out", str(out),
                 "--mode", "whole", "--quiet")
    assert segment_cmd.run(args) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "cut.png" in err and "2 written, 0 already done, 2 failed of 4 items" in err
    assert (out / "masks" / "img0.png").exists() and (out / "masks" / "img1.png").exists()
    assert not (out / "masks" / "broken.png").exists() and not (out / "masks" / "cut.png").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["failed"] == 2 and record["exit_code"] == 1
    bad = sorted(r["input"] for r in record["images"] if r["status"] == "error")
    assert len(bad) == 2 and bad[0].endswith("broken.jpg") and bad[1].endswith("cut.png")
    errors = {r["item"]: r for r in _manifest(out) if r["status"] == "error"}
    assert set(errors) == {"broken", "cut"} and {r["error_kind"] for r in errors.values()} == {"decode"}


@pytest.mark.parametrize("classes", ["", "  ", "; background: sky"])
def test_empty_class_list_is_a_clear_error(parser, tmp_path, classes):
    images = _write_images(tmp_path / "in", sizes=((32, 32),))
    args = _args(parser, str(images), "--classes", classes, "--out", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="(?i)empty|no classes"):
        segment_cmd.run(args)
    assert not (tmp_path / "out").exists()  # failed before any work


def test_unknown_method(parser, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _args(parser, "x.png", "--classes", "cat", "--out", str(tmp_path), "--method", "segformer")
    assert exc.value.code == 2
    assert "invalid choice: 'segformer'" in capsys.readouterr().err
    # programmatic callers get a ValueError naming the choices
    args = _args(parser, "x.png", "--classes", "cat", "--out", str(tmp_path))
    args.method = "segformer"
    with pytest.raises(ValueError, match="unknown method 'segformer'"):
        segment_cmd.run(args)


def test_missing_input_and_missing_default_weights(parser, tmp_path, monkeypatch):
    args = _args(parser, str(tmp_path / "nope"), "--classes", "cat", "--out", str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no such image or folder"):
        segment_cmd.run(args)
    images = _write_images(tmp_path / "in", sizes=((32, 32),))
    monkeypatch.setattr("tag2mask.cmdline.options.shipped_weights_path", lambda: tmp_path / "absent.safetensors")
    args = _args(parser, str(images), "--classes", "cat", "--out", str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="--weights"):
        segment_cmd.run(args)


def test_output_stems_are_disambiguated(tmp_path):
    files = [tmp_path / "a.jpg", tmp_path / "a.png", tmp_path / "b.png"]
    assert segment_cmd.output_stems(files) == {files[0]: "a_jpg", files[1]: "a_png", files[2]: "b"}
