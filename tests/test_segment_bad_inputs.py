"""``tag2mask segment`` over a corpus of bad and awkward inputs (the batch-job corpus of ``label``, for ``segment``).

One run (tiny CLIP, whole mode) processes every case of :data:`CASES`; each case is then its own
test asserting the manifest record: ``ok`` with a full-size mask for inputs that must work (very thin
strips, images above ``--max-pixels``), or ``error`` with the expected kind and a message naming the
file and the problem (including entries that only look like images: a broken symlink, a folder).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

RNG = np.random.default_rng(1)
MAX_PIXELS = 4096  # 64x64: larger images are segmented downscaled
MAX_DECODE = 100_000  # the over-limit case (400x400) is refused before decoding


def _png(h: int, w: int) -> Callable[[], bytes]:
    def make() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    return make


def _png_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


@dataclass
class Case:
    id: str
    name: str  # file name in the input folder
    expect: str  # "ok" or the error kind
    message: tuple[str, ...] = ()
    data: Optional[Callable[[], bytes]] = None  # None: made specially (folder, link)
    shape: Optional[tuple[int, int]] = None  # mask shape for ok cases
    processed: Optional[tuple[int, int]] = None  # working size when downscaled


CASES = [
    Case("plain", "plain.png", "ok", data=_png(40, 48), shape=(40, 48)),
    Case("strip_1x300", "strip.png", "ok", data=_png(1, 300), shape=(1, 300)),
    Case("column_300x1", "column.png", "ok", data=_png(300, 1), shape=(300, 1)),
    Case("strip_2x20000", "long.png", "ok", data=_png(2, 20000), shape=(2, 20000), processed=(1, 4096)),
    Case("above_max_pixels", "big.png", "ok", data=_png(100, 120), shape=(100, 120), processed=(58, 70)),
    Case("one_pixel", "dot.png", "ok", data=_png(1, 1), shape=(1, 1)),
    Case("zero_byte", "zero.jpg", "decode", ("zero.jpg", "empty (0 bytes)"), lambda: b""),
    Case("text_as_jpg", "notes.jpg", "decode", ("notes.jpg", "not a recognised image format"), lambda: b"hello\n" * 30),
    Case("truncated_png", "cut.png", "decode", ("cut.png", "truncated"), lambda: _png(40, 40)()[:200]),
    Case("bomb_header", "bomb.png", "decode", ("bomb.png", "decompression bomb"), lambda: _png_claiming(100_000, 100_000)),
    Case("over_decode_limit", "huge.png", "decode", ("huge.png", "400x400", "more than max_pixels"), _png(400, 400)),
    Case("folder_named_jpg", "folder.jpg", "decode", ("folder.jpg", "not a regular file")),
    Case("broken_symlink", "dangling.jpg", "decode", ("dangling.jpg", "broken symbolic link")),
]
IDS = [c.id for c in CASES]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, tiny_clip_path):
    from tag2mask.cli.main import main

    root = tmp_path_factory.mktemp("segment_bad_inputs")
    images = root / "images"
    images.mkdir()
    for case in CASES:
        if case.data is not None:
            (images / case.name).write_bytes(case.data())
    (images / "folder.jpg").mkdir()
    os.symlink(root / "nowhere.jpg", images / "dangling.jpg")
    (images / "readme.txt").write_text("not an image suffix: never listed")
    out = root / "out"
    old_cache = os.environ.get("TAG2MASK_CACHE")
    os.environ["TAG2MASK_CACHE"] = str(root / "cache")
    try:
        rc = main(["segment", str(images), "--classes", "cat, dog; background: sky", "--weights", str(tiny_clip_path),
                   "--out", str(out), "--mode", "whole", "--short-side", "64", "--overlay", "--save-logits",
                   "--max-pixels", str(MAX_PIXELS), "--max-decode-pixels", str(MAX_DECODE), "--device", "cpu", "--quiet"])
    finally:
        if old_cache is None:
            os.environ.pop("TAG2MASK_CACHE", None)
        else:
            os.environ["TAG2MASK_CACHE"] = old_cache
    records = {}
    for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        assert rec["item"] not in records
        records[rec["item"]] = rec
    return rc, records, out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_segment_bad_input_case(corpus_run, case):
    from tag2mask.io.palette import read_label_png

    _rc, records, out = corpus_run
    item = case.name.rsplit(".", 1)[0]
    assert item in records, f"{case.id}: no record for {item!r} (silently skipped?); have {sorted(records)}"
    rec = records[item]
    if case.expect == "ok":
        assert rec["status"] == "ok", rec.get("error")
        assert read_label_png(out / "masks" / f"{item}.png").shape == case.shape
        with Image.open(out / "overlays" / f"{item}.png") as overlay:
            assert overlay.size[0] == case.shape[1]
        assert rec["size"] == list(case.shape)
        assert rec.get("processed_size") == (list(case.processed) if case.processed else None)
        with np.load(out / "logits" / f"{item}.npz") as z:  # logits stay at the processed size
            assert z["logits"].shape[1:] == (case.processed or case.shape)
        assert rec["source"]["size"] == (out.parent / "images" / case.name).stat().st_size
        return
    assert rec["status"] == "error" and rec["error_kind"] == case.expect, rec
    for text in case.message:
        assert text in rec["error"], f"{case.id}: {text!r} not in {rec['error']!r}"


def test_segment_corpus_summary(corpus_run):
    rc, records, out = corpus_run
    n_bad = sum(c.expect != "ok" for c in CASES)
    assert rc == 1 and len(records) == len(CASES)
    run = json.loads((out / "run.json").read_text())
    assert run["failed"] == n_bad and run["written"] == len(CASES) - n_bad
    assert "readme" not in records


def test_refuse_policy(tmp_path, tiny_clip_path, monkeypatch):
    from tag2mask.cli.main import main

    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "images"
    images.mkdir()
    (images / "big.png").write_bytes(_png(100, 120)())
    (images / "small.png").write_bytes(_png(16, 16)())
    out = tmp_path / "out"
    rc = main(["segment", str(images), "--classes", "cat", "--weights", str(tiny_clip_path), "--out", str(out),
               "--mode", "whole", "--short-side", "32", "--max-pixels", "4096", "--max-pixels-policy", "refuse",
               "--device", "cpu", "--quiet"])
    assert rc == 1
    recs = {json.loads(l)["item"]: json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()}
    assert recs["small"]["status"] == "ok" and recs["big"]["error_kind"] == "too_large"
    assert "big.png: image is 120x100 = 12,000 pixels, more than --max-pixels 4,096" in recs["big"]["error"]
