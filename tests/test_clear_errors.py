"""Bad input files and arguments get one clear line naming the file, never a codec traceback or silence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(folder / "a.png")
    return folder


def _run(*argv: str) -> int:
    from tag2mask.cli.main import main

    return main(list(argv))


@pytest.mark.parametrize("name, content", [
    ("labels.json", b'{"a.png": ["caf\xe9"]}'),
    ("labels.csv", b"image,labels\na.png,chat\nb.png,caf\xe9\n"),
])
def test_non_utf8_label_file_names_the_file(tmp_path, images, tiny_clip_path, capsys, name, content):
    labels = tmp_path / name
    labels.write_bytes(content)
    rc = _run("label", str(images), "--labels", str(labels), "--weights", str(tiny_clip_path), "--out",
              str(tmp_path / "out"), "--refine", "none", "--device", "cpu", "--quiet")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(labels) in err and "not UTF-8" in err and "0xe9" in err


def test_non_utf8_class_file_names_the_file(tmp_path, images, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"cat\ncaf\xe9\n")
    rc = _run("segment", str(images), "--classes", str(classes), "--out", str(tmp_path / "out"), "--quiet")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{classes}:2: not UTF-8" in err


def test_inline_syntax_saved_in_a_class_file_is_detected(tmp_path):
    from tag2mask.vocab.vocabulary import load_vocabulary

    for text in ("cat, dog; background: sky, grass\n", "# mine\nperson|people|human\n"):
        path = tmp_path / "classes.txt"
        path.write_text(text)
        with pytest.raises(ValueError, match="inline syntax") as info:
            load_vocabulary(str(path))
        assert str(path) in str(info.value)
    path.write_text("cat\ndog, puppy\nbackground: sky, grass\n")  # the file syntax still works
    vocab = load_vocabulary(str(path))
    assert vocab.names == ("cat", "dog") and vocab.background == ("sky", "grass")


def test_long_inline_class_list_is_not_a_path(tmp_path, images, tiny_clip_path):
    from tag2mask.vocab.vocabulary import load_vocabulary

    classes = ", ".join(f"class number {i}" for i in range(30)) + "; background: sky"
    assert len(classes.encode()) > 255  # the longest file name
    vocab = load_vocabulary(classes)
    assert len(vocab.names) == 30 and vocab.background == ("sky",)
    out = tmp_path / "out"
    rc = _run("segment", str(images), "--classes", classes, "--weights", str(tiny_clip_path), "--out", str(out),
              "--templates", "photo", "--mode", "whole", "--short-side", "32", "--device", "cpu", "--quiet")
    assert rc == 0
    assert len(json.loads((out / "run.json").read_text())["class_names"]) == 31


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_eval_cams_refuses_non_finite_cams(tmp_path, capsys, bad):
    from tag2mask.io.palette import save_label_png

    cams, gt = tmp_path / "cams", tmp_path / "gt"
    cams.mkdir()
    gt.mkdir()
    for i in range(2):
        values = np.random.default_rng(i).random((1, 8, 8)).astype(np.float16)
        if i == 1:
            values[0, :4] = bad
        np.savez(cams / f"im{i}.npz", cams=values, keys=np.array([0]))
        save_label_png(gt / f"im{i}.png", np.ones((8, 8), np.uint8))
    rc = _run("eval", str(cams), "--cams", "--gt", str(gt), "--classes", "voc")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(cams / "im1.npz") in err and "NaN or infinite" in err
    assert not (cams / "eval.json").exists()
