"""One path rule (tag2mask.io.paths.path_inside) for every path read from a run folder or manifest.

A run folder may come from someone else: a tampered ``checkpoints.jsonl`` or ``manifest.jsonl`` must
never direct a delete (or a read) outside the folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tag2mask.io.manifest import verify_outputs
from tag2mask.io.paths import UnsafePathError, path_inside
from tag2mask.jobs.checkpoint import RECORD, latest_checkpoint, save_checkpoint


def test_path_inside_accepts_inside_and_refuses_everything_else(tmp_path):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "sub" / "a.png").write_bytes(b"x")
    assert path_inside(run, "sub/a.png", "m.jsonl") == (run / "sub" / "a.png").resolve()
    assert path_inside(run, str(run / "sub" / "a.png"), "m.jsonl") == (run / "sub" / "a.png").resolve()
    (run / "out").symlink_to(tmp_path)  # a symlink leading out of the folder
    (run / "loop").symlink_to(run / "loop")
    for bad in ["../victim.txt", "sub/../../victim.txt", str(tmp_path / "victim.txt"), "/etc/passwd", "", "a\x00b",
                "out/victim.txt", "x" * 300, 5, None]:
        with pytest.raises(UnsafePathError) as info:
            path_inside(run, bad, run / "m.jsonl")
        assert str(run / "m.jsonl") in str(info.value) and repr(bad) in str(info.value), bad
    assert path_inside(run, "loop", "m") == run.resolve() / "loop"  # a loop inside: unreadable later, not escaping
    with pytest.raises(UnsafePathError, match="absolute"):
        path_inside(run, str(run / "sub" / "a.png"), "m", must_be_relative=True)


def test_manifest_outputs_outside_the_run_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    with pytest.raises(UnsafePathError, match="manifest.jsonl"):
        verify_outputs(run, {"item": "a", "status": "ok", "outputs": ["../secret.txt"]})
    with pytest.raises(UnsafePathError, match="secret.txt"):
        verify_outputs(run, {"item": "a", "status": "ok", "outputs": [str(secret)]})


def _plant(run: Path, victims: list[Path]) -> None:
    with open(run / RECORD, "a", encoding="utf-8") as f:
        for v in victims:
            rel = os.path.relpath(v, run)
            for entry in (rel, str(v)):  # relative with '..' and absolute
                f.write(json.dumps({"item": entry, "status": "ok", "outputs": [entry], "step": 0}) + "\n")


def test_keep_last_never_deletes_outside_the_folder(tmp_path):
    run = tmp_path / "a" / "run"
    save_checkpoint(run, 1, {"w": torch.zeros(2)})
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    _plant(run, [victim])
    with pytest.raises(UnsafePathError, match=RECORD):
        latest_checkpoint(run)
    with pytest.raises(UnsafePathError, match="victim.txt"):
        save_checkpoint(run, 2, {"w": torch.ones(2)}, keep_last=1)
    assert victim.read_text() == "keep me"


def test_train_resume_keep_last_deletes_nothing_outside(tmp_path, capsys, monkeypatch, tiny_clip_path):
    from tag2mask.cli.main import main

    run = tmp_path / "a" / "b" / "run"
    base = ["train", "weclip", "--data", "synth", "--weights", str(tiny_clip_path), "--out", str(run),
            "--batch-size", "1", "--crop", "32", "--val-split", "none", "--device", "cpu", "--no-compat", "--quiet",
            "--synth-n", "2", "--synth-size", "32"]
    monkeypatch.setattr(sys, "argv", ["tag2mask", *base])
    assert main([*base, "--iters", "1"]) == 0
    victims = [tmp_path / "victim.txt", tmp_path / "a" / "other.txt"]
    for v in victims:
        v.write_text("keep me")
    _plant(run, victims)
    capsys.readouterr()
    rc = main([*base, "--iters", "2", "--resume", "--keep-last", "1"])
    # --iters 2 ends inside the warm-up: that warning may come first; the refusal itself is one line
    err = "\n".join(ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("warning: --iters"))
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert RECORD in err and "resolves outside the folder" in err
    assert all(v.read_text() == "keep me" for v in victims)


# ---- reruns into a finished --out: refused without --resume / --overwrite --------------------------


def _one_image(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("command", ["label", "segment"])
def test_rerun_into_a_finished_out_is_refused(tmp_path, capsys, tiny_clip_path, command):
    from tag2mask.cli.main import main

    images = _one_image(tmp_path / "images")
    out = tmp_path / "out"
    if command == "label":
        (tmp_path / "labels.json").write_text(json.dumps({"a.png": ["cat"]}))
        args = ["label", str(images), "--labels", str(tmp_path / "labels.json"), "--classes", "voc",
                "--refine", "none"]
    else:
        args = ["segment", str(images), "--classes", "cat, dog"]
    args += ["--weights", str(tiny_clip_path), "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args) == 0
    mask = next((out / "masks").rglob("*.png"))
    mask.write_bytes(mask.read_bytes())  # "hand-corrected": must survive a plain rerun
    stamp = mask.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" in err and "--overwrite" in err and "earlier run" in err
    assert mask.stat().st_mtime_ns == stamp
    assert main([*args, "--resume"]) == 0 and mask.stat().st_mtime_ns == stamp  # nothing redone
    assert main([*args, "--overwrite"]) == 0 and mask.stat().st_mtime_ns != stamp  # redone on request
