"""One clean line for every refused file, a busy port, bad JSON and Ctrl-C: never torch's or Python's advice."""

from __future__ import annotations

import collections
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.cli.main import main

REPO = Path(__file__).resolve().parents[1]
#: what must never reach a user: torch's advice to turn the safety off, or a traceback
FORBIDDEN = ("weights_only", "safe_globals", "allowlist", "Traceback", "trusted source", "torch.load")


class Custom:
    pass


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("refused")
    out = {"objects": d / "objects.pt", "plain_pickle": d / "plain.pkl", "text": d / "text.pt",
           "torchscript": d / "ts.pt", "json": d / "labels.json", "truncated": d / "trunc.pt"}
    torch.save({"a": Custom(), "w": torch.zeros(2)}, out["objects"])
    out["plain_pickle"].write_bytes(pickle.dumps(collections.Counter(a=1)))
    out["text"].write_text("hello world\n")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(out["torchscript"]))
    out["json"].write_text(json.dumps({"a.png": ["cat"]}))
    torch.save({"w": torch.zeros(64)}, d / "full.pt")
    out["truncated"].write_bytes((d / "full.pt").read_bytes()[:200])
    Image.new("RGB", (16, 16)).save(d / "x.png")
    return out


def _one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err, err
    assert not any(f in err for f in FORBIDDEN), err
    return err


@pytest.mark.parametrize("kind", ["objects", "plain_pickle", "text", "torchscript", "json", "truncated"])
@pytest.mark.parametrize("entry", ["info", "segment_weights", "segment_checkpoint", "convert_checkpoint",
                                   "convert_weclip", "pretrained"])
def test_every_refused_file_is_one_clean_line(files, kind, entry, tmp_path, capsys):
    f = str(files[kind])
    image = str(files["objects"].parent / "x.png")
    out = str(tmp_path / "o")
    if entry == "pretrained":
        from tag2mask.clip.loading import WeightsError
        from tag2mask.models.resnet import read_checkpoint

        with pytest.raises(WeightsError) as info:
            read_checkpoint(f)
        msg = str(info.value)
        assert f in msg and not any(x in msg for x in FORBIDDEN), msg
        return
    argv = {"info": ["info", "--weights", f],
            "segment_weights": ["segment", image, "--classes", "cat", "--weights", f, "--out", out],
            "segment_checkpoint": ["segment", image, "--checkpoint", f, "--out", out],
            "convert_checkpoint": ["convert", "checkpoint", f, "--out", out],
            "convert_weclip": ["convert", "weclip", f, "--out", out]}[entry]
    err = _one_line(capsys, main(argv))
    assert f in err
    if kind == "objects":
        assert "refused" in err and "Custom" in err
    if kind == "torchscript" and entry != "info" and entry != "segment_weights":
        assert "TorchScript" in err
    if kind in ("text", "json", "truncated", "plain_pickle"):
        assert "not a readable" in err or "not a " in err


def test_checkpoint_without_weights_names_what_is_missing(tmp_path, capsys, files):
    ck = tmp_path / "noweights.pt"
    torch.save({"format": "tag2mask-train-v2", "task": "weclip", "config_json": "{}"}, ck)
    err = _one_line(capsys, main(["segment", str(files["objects"].parent / "x.png"), "--checkpoint", str(ck),
                                  "--out", str(tmp_path / "o")]))
    assert str(ck) in err and "without model weights" in err


@pytest.mark.parametrize("text,why", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                      ('{"a.png": [' + "9" * 5000 + "]}", "too many digits")])
def test_hostile_json_is_a_clear_error_naming_the_file(tmp_path, capsys, files, tiny_clip_path, text, why):
    labels = tmp_path / "labels.json"
    labels.write_text(text)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    err = _one_line(capsys, main(["label", str(images), "--labels", str(labels), "--classes", "voc", "--weights",
                                  str(tiny_clip_path), "--out", str(tmp_path / "o"), "--quiet"]))
    assert str(labels) in err and why in err


def test_busy_port_and_bad_host_are_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for extra in (["--port", str(port)], ["--host", "no-such-host.invalid"]):
            r = subprocess.run([sys.executable, "-m", "tag2mask", "serve", *extra], capture_output=True, text=True,
                               cwd=REPO, timeout=120)
            err = r.stderr.strip()
            assert r.returncode == 2 and "\n" not in err and "cannot listen on" in err, err
            assert "AttributeError" not in err and "Traceback" not in err


def _interrupt(argv: list[str], ready: callable, timeout: float = 240) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "tag2mask", *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True, cwd=REPO, env=env)
    t0 = time.time()
    while not ready() and p.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.1)
    assert p.poll() is None, "finished before it could be interrupted"
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1].strip()
    return p.returncode, err


def test_ctrl_c_during_segment_is_one_line_saying_how_to_resume(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    out = tmp_path / "out"

    def some_done() -> bool:
        return any(p.stat().st_size > 0 for p in out.glob("manifest*.jsonl")) if out.is_dir() else False

    rc, err = _interrupt(["segment", str(images), "--classes", "cat, dog", "--device", "cpu", "--quiet", "--out",
                          str(out)], some_done)
    last = err.splitlines()[-1]
    assert rc == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in last and "finished item(s) recorded in" in last and "--resume" in last, last


def test_ctrl_c_during_train_names_the_kept_checkpoint(tmp_path, tiny_clip_path):
    run = tmp_path / "run"

    def saved() -> bool:
        return (run / "checkpoints.jsonl").is_file() and (run / "checkpoints.jsonl").stat().st_size > 0

    rc, err = _interrupt(["train", "weclip", "--data", "synth", "--weights", str(tiny_clip_path), "--out", str(run),
                          "--iters", "100000", "--ckpt-every", "1", "--batch-size", "1", "--crop", "32",
                          "--val-split", "none", "--device", "cpu", "--no-compat", "--quiet", "--synth-n", "2",
                          "--synth-size", "32"], saved)
    last = err.splitlines()[-1]
    assert rc == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in last and "checkpoint of iteration" in last and "--resume" in last, last
