"""Every unreadable input is reported in the manifest and run.json, never silently skipped (issue #30)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.cli.main import main
from tag2mask.io.manifest import MANIFEST_NAME, latest_records

LONG = "a" * 236 + ".png"  # a valid 240-character name: its temporary output name must still fit


def _png(h: int = 16, w: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_header() -> bytes:
    data = bytearray(_png(1, 1))
    ihdr = struct.pack(">II", 60000, 60000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _corpus(folder: Path) -> dict[str, bool]:
    """Write the inputs; returns ``{file name: should succeed}``."""
    folder.mkdir()
    good = _png()
    (folder / "good.png").write_bytes(good)
    (folder / LONG).write_bytes(good)
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    bad_crc = bytearray(good)
    bad_crc[30] ^= 0xFF
    (folder / "bad_crc.png").write_bytes(bytes(bad_crc))
    (folder / "text.png").write_text("<html>not an image</html>")
    (folder / "folder.jpg").mkdir()
    os.mkfifo(folder / "fifo.jpg")
    (folder / "broken.png").symlink_to(folder / "missing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "bomb.png").write_bytes(_bomb_header())
    return {"good.png": True, LONG: True, **{n: False for n in (
        "zero.png", "truncated.png", "bad_crc.png", "text.png", "folder.jpg", "fifo.jpg", "broken.png", "loop.png",
        "bomb.png")}}


@pytest.mark.parametrize("command", ["label", "segment"])
def test_every_unreadable_input_is_in_the_manifest_and_summary(tmp_path, tiny_clip_path, command, capsys):
    images = tmp_path / "images"
    expected = _corpus(images)
    out = tmp_path / "out"
    if command == "label":
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps({name: ["cat"] for name in expected}))
        argv = ["label", str(images), "--labels", str(labels), "--classes", "voc", "--refine", "none"]
    else:
        argv = ["segment", str(images), "--classes", "cat, dog"]
    rc = main([*argv, "--weights", str(tiny_clip_path), "--device", "cpu", "--quiet", "--out", str(out),
               "--max-decode-pixels", "10000000"])
    assert rc == 1  # some items failed; the job itself ran to its end
    records = latest_records([out / MANIFEST_NAME])
    by_stem = {Path(k).name: r for k, r in records.items()}
    for name, ok in expected.items():
        rec = by_stem.get(Path(name).with_suffix("").name)
        assert rec is not None, f"{name}: no manifest record (silently skipped)"
        assert rec["status"] == ("ok" if ok else "error"), (name, rec)
        if not ok:
            assert rec.get("error"), (name, rec)
    summary = json.loads((out / "run.json").read_text())
    text = json.dumps(summary)
    assert str(sum(not ok for ok in expected.values())) in text  # the failure count is in the summary


def test_label_folder_without_labels_lists_unreadable_entries(tmp_path):
    from tag2mask.data.datasets import FolderDataset

    expected = _corpus(tmp_path / "images")
    names = {Path(s.image_path).name for s in FolderDataset(tmp_path / "images")}
    assert set(expected) <= names, set(expected) - names
