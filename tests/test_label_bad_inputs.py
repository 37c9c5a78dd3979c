"""``tag2mask label`` over a corpus of bad (and merely awkward) inputs.

One labelling run (tiny CLIP, ``--refine none``) processes every case of :data:`CASES`; each case
is then its own test asserting the manifest record: ``ok`` for inputs that must work (CMYK,
16-bit, palette, alpha, 1x1, non-ASCII names ...), or ``error`` with the expected kind and a
message naming the file and the problem. The job must go on past every failure, exit with 1 and
count the failures in ``run.json``.
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

RNG = np.random.default_rng(0)
MAX_PIXELS = 4096  # 64x64: the "huge" case (120x100) is downscaled
MAX_DECODE = 20_000  # the "bomb" cases (150x150, a header claiming 100000x100000) are refused


def _rgb(h: int = 48, w: int = 48) -> np.ndarray:
    return RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (with a correct CRC) claims ``width x height``."""
    data = bytearray(_save(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _png_bad_crc() -> bytes:
    data = bytearray(_save(Image.fromarray(_rgb()), "PNG"))
    data[60] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    return bytes(data)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a 40x20 file is shown 20x40
    return _save(Image.fromarray(_rgb(20, 40)), "JPEG", exif=exif)


def _gif_frames() -> bytes:
    frames = [Image.fromarray(_rgb(32, 32)).convert("P") for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _palette_transparent() -> bytes:
    img = Image.fromarray(_rgb(32, 32)).convert("P")
    return _save(img, "PNG", transparency=0)


@dataclass
class Case:
    """One corpus entry: label-file ``entry``, its ``labels``, how to make the file, what to expect."""

    id: str
    entry: str
    expect: str  # "ok" or the error kind
    message: tuple[str, ...] = ()  # substrings of the error message (the file and the problem)
    data: Optional[Callable[[], bytes]] = None  # file content (None: no file is written)
    labels: tuple[str, ...] = ("cat",)
    item: Optional[str] = None  # manifest item name (default: entry without suffix for ok/decode cases)
    shape: Optional[tuple[int, int]] = None  # expected mask shape for ok cases


def _png(arr_fn: Callable[[], Image.Image]) -> Callable[[], bytes]:
    return lambda: _save(arr_fn(), "PNG")


CASES = [
    # --- files that are not decodable images -------------------------------------------------
    Case("zero_byte", "zero.jpg", "decode", ("zero.jpg", "empty (0 bytes)"), lambda: b""),
    Case("truncated_jpeg", "trunc_jpeg.jpg", "decode", ("trunc_jpeg.jpg", "truncated"),
         lambda: _save(Image.fromarray(_rgb()), "JPEG")[:400]),
    Case("truncated_png", "trunc_png.png", "decode", ("trunc_png.png", "truncated"),
         lambda: _save(Image.fromarray(_rgb()), "PNG")[:3000]),
    Case("png_signature_only", "sigonly.png", "decode", ("sigonly.png",), lambda: b"\x89PNG\r\n\x1a\n"),
    Case("png_bad_crc", "badcrc.png", "decode", ("badcrc.png", "corrupt"), _png_bad_crc),
    Case("text_as_jpg", "notes.jpg", "decode", ("notes.jpg", "not a recognised image format"),
         lambda: b"this is not an image\n" * 20),
    Case("html_as_png", "page.png", "decode", ("page.png", "not a recognised image format"),
         lambda: b"<html><body>404</body></html>"),
    Case("random_bytes", "noise.webp", "decode", ("noise.webp", "not a recognised image format"),
         lambda: bytes(RNG.integers(0, 255, 512, dtype=np.uint8))),
    Case("txt_extension", "readme.txt", "decode", ("readme.txt", "not a recognised image format"),
         lambda: b"hello"),
    Case("missing_file", "ghost.png", "decode", ("ghost.png", "file not found")),
    Case("directory", "folder.png", "decode", ("folder.png", "not a regular file")),
    # the entry resolves through the link, so the message names the missing target
    Case("broken_symlink", "dangling.png", "decode", ("no_such_target.png", "file not found")),
    Case("claimed_huge_header", "bomb_header.png", "decode", ("bomb_header.png", "decompression bomb"),
         lambda: _png_claiming(100_000, 100_000)),
    Case("over_decode_limit", "bomb.png", "decode", ("bomb.png", "150x150", "more than max_pixels", "decompression bomb"),
         _png(lambda: Image.fromarray(_rgb(150, 150)))),
    # --- unusual but valid images: must be labelled ----------------------------------------------
    Case("cmyk_jpeg", "cmyk.jpg", "ok", data=lambda: _save(Image.fromarray(_rgb()).convert("CMYK"), "JPEG"), shape=(48, 48)),
    Case("grey16_png", "grey16.png", "ok",
         data=_png(lambda: Image.fromarray(RNG.integers(0, 65535, (40, 30), dtype=np.uint16))), shape=(40, 30)),
    Case("float_tiff", "float.tif", "ok",
         data=lambda: _save(Image.fromarray(RNG.random((24, 24), dtype=np.float32) * 300), "TIFF"), shape=(24, 24)),
    Case("palette_png", "palette.png", "ok", data=_png(lambda: Image.fromarray(_rgb(32, 32)).convert("P")), shape=(32, 32)),
    Case("palette_transparency", "ptrans.png", "ok", data=_palette_transparent, shape=(32, 32)),
    Case("rgba_png", "rgba.png", "ok",
         data=_png(lambda: Image.fromarray(RNG.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA")), shape=(32, 32)),
    Case("la_png", "la.png", "ok", data=_png(lambda: Image.fromarray(_rgb(16, 16)).convert("LA")), shape=(16, 16)),
    Case("bilevel_png", "bilevel.png", "ok", data=_png(lambda: Image.fromarray(_rgb()).convert("1")), shape=(48, 48)),
    Case("grey_jpeg", "grey.jpg", "ok", data=lambda: _save(Image.fromarray(_rgb()).convert("L"), "JPEG"), shape=(48, 48)),
    Case("one_pixel", "one.png", "ok", data=_png(lambda: Image.fromarray(_rgb(1, 1))), shape=(1, 1)),
    Case("one_pixel_strip", "strip.png", "ok", data=_png(lambda: Image.fromarray(_rgb(1, 60))), shape=(1, 60)),
    Case("strip_1x300", "strip300.png", "ok", data=_png(lambda: Image.fromarray(_rgb(1, 300))), shape=(1, 300)),
    Case("column_300x1", "column300.png", "ok", data=_png(lambda: Image.fromarray(_rgb(300, 1))), shape=(300, 1)),
    Case("animated_gif", "anim.gif", "ok", data=_gif_frames, shape=(32, 32)),
    Case("exif_rotated", "rotated.jpg", "ok", data=_exif_rotated, shape=(40, 20)),
    Case("png_named_jpg", "really_png.jpg", "ok", data=_png(lambda: Image.fromarray(_rgb(20, 20))), shape=(20, 20)),
    Case("huge_downscaled", "huge.png", "ok", data=_png(lambda: Image.fromarray(_rgb(100, 120))), shape=(100, 120)),
    Case("non_ascii_name", "café_日本 ü.png", "ok", data=_png(lambda: Image.fromarray(_rgb(16, 16))), shape=(16, 16)),
    Case("nested_name", "sub/deep/img.png", "ok", data=_png(lambda: Image.fromarray(_rgb(16, 16))), shape=(16, 16)),
    Case("duplicate_labels", "dupl.png", "ok", data=_png(lambda: Image.fromarray(_rgb(16, 16))),
         labels=("cat", "cat", " Cat ", "dog"), shape=(16, 16)),
    # --- bad label lists ------------------------------------------------------------------------
    Case("empty_label_list", "nolabels.png", "labels", ("nolabels.png", "empty label list"),
         _png(lambda: Image.fromarray(_rgb(16, 16))), labels=()),
    Case("blank_labels", "blank.png", "labels", ("blank.png", "empty label list"),
         _png(lambda: Image.fromarray(_rgb(16, 16))), labels=("  ", "")),
    Case("unknown_label", "unicorn.png", "labels", ("unicorn.png", "unknown class name 'unicorn'", "valid names"),
         _png(lambda: Image.fromarray(_rgb(16, 16))), labels=("unicorn",), item="unicorn.png"),
    Case("known_and_unknown", "mixed.png", "labels", ("mixed.png", "unknown class name 'dragon'"),
         _png(lambda: Image.fromarray(_rgb(16, 16))), labels=("cat", "dragon"), item="mixed.png"),
    # --- entries pointing outside the image folder ----------------------------------------------
    Case("dotdot_traversal", "../outside.png", "labels", ("../outside.png", "outside the image folder"), item="../outside.png"),
    Case("backslash_traversal", "..\\outside.png", "labels", ("outside the image folder",), item="..\\outside.png"),
    Case("nested_traversal", "sub/../../outside.png", "labels", ("outside the image folder",), item="sub/../../outside.png"),
    Case("absolute_path", "/etc/hostname", "labels", ("/etc/hostname", "absolute path"), item="/etc/hostname"),
    Case("windows_drive", "C:\\Windows\\win.ini", "labels", ("absolute path",), item="C:\\Windows\\win.ini"),
    Case("symlink_outside", "link.png", "labels", ("link.png", "resolves outside"), item="link.png"),
    Case("nul_in_name", "a\x00b.png", "labels", ("invalid name",), item="a\x00b.png"),
    Case("empty_name", "", "labels", ("invalid name",), item=""),
    # --- two entries with one output name -------------------------------------------------------
    Case("duplicate_stem_first", "twin.png", "ok", data=_png(lambda: Image.fromarray(_rgb(16, 16))), shape=(16, 16)),
    Case("duplicate_stem_second", "twin.jpg", "duplicate", ("twin.jpg", "same output name 'twin'", "twin.png"),
         lambda: _save(Image.fromarray(_rgb(16, 16)), "JPEG"), item=None),
]
IDS = [c.id for c in CASES]


def _item_name(case: Case, records: dict) -> str:
    if case.item is not None:
        return case.item
    stem = case.entry.rsplit(".", 1)[0]
    if case.expect == "duplicate":  # recorded under its own name, pointing at the item it clashes with
        return next(k for k, r in records.items() if r.get("duplicate_of") == stem)
    return stem


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, tiny_clip_path):
    """Build the corpus, run ``tag2mask label`` once over it; return (exit code, records, out dir)."""
    from tag2mask.cli.main import main

    root = tmp_path_factory.mktemp("bad_inputs")
    images = root / "images"
    images.mkdir()
    _save_outside = root / "outside.png"
    Image.fromarray(_rgb(16, 16)).save(_save_outside)
    for case in CASES:
        if case.data is not None:
            path = images / case.entry
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(case.data())
    (images / "folder.png").mkdir()
    os.symlink(_save_outside, images / "link.png")
    os.symlink(images / "no_such_target.png", images / "dangling.png")
    labels = {c.entry: list(c.labels) for c in CASES}
    (root / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    out = root / "out"
    rc = main([
        "label", str(images), "--labels", str(root / "labels.json"), "--classes", "voc",
        "--weights", str(tiny_clip_path), "--out", str(out), "--refine", "none", "--device", "cpu",
        "--max-pixels", str(MAX_PIXELS), "--max-decode-pixels", str(MAX_DECODE), "--quiet",
    ])
    records = {}
    for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        assert rec["item"] not in records, f"item {rec['item']!r} listed twice"
        records[rec["item"]] = rec
    return rc, records, out


def test_corpus_has_at_least_30_cases():
    assert len(CASES) >= 30 and len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_case(corpus_run, case):
    from tag2mask.io.palette import read_label_png

    _rc, records, out = corpus_run
    item = _item_name(case, records)
    assert item in records, f"{case.id}: no manifest record for {item!r}; have {sorted(records)}"
    rec = records[item]
    if case.expect == "ok":
        assert rec["status"] == "ok", rec.get("error")
        mask = read_label_png(out / rec["outputs"][0])
        assert mask.shape == case.shape
        assert rec["size"] == list(case.shape)
        with np.load(out / rec["outputs"][1]) as z:
            assert z["cams"].dtype == np.float16 and list(z["keys"]) == [7] + ([11] if "dog" in case.labels else [])
        return
    assert rec["status"] == "error"
    assert rec["error_kind"] == case.expect, rec
    for text in case.message:
        assert text in rec["error"], f"{case.id}: {text!r} not in {rec['error']!r}"
    assert rec["outputs"] == []


def test_corpus_job_summary(corpus_run):
    rc, records, out = corpus_run
    n_bad = sum(c.expect != "ok" for c in CASES)
    assert rc == 1  # some items failed, the job still finished
    assert len(records) == len(CASES)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["failed"] == n_bad and run["written"] == len(CASES) - n_bad
    assert run["manifest_counts"] == {"ok": len(CASES) - n_bad, "error": n_bad}
    # special cases of the outputs contract
    assert (out / "masks" / "sub" / "deep" / "img.png").is_file()
    assert (out / "masks" / "café_日本 ü.png").is_file()
    assert records["huge"]["processed_size"] == [58, 70]  # 70*58 = 4060 <= 4096, aspect kept
    assert records["dupl"]["labels"] == ["cat", "dog"]
    log_lines = (out / "logs" / "rank0.log").read_text(encoding="utf-8").splitlines()
    events = [json.loads(l)["event"] for l in log_lines]
    assert events[0] == "start" and events[-1] == "end" and events.count("error") == n_bad


# ---- job-level problems: one clear line, exit code 2 -----------------------------------------------


def _label(tmp_path, tiny_clip_path, *extra, images=None, labels=None):
    from tag2mask.cli.main import main

    if images is None:
        images = tmp_path / "images"
        images.mkdir(exist_ok=True)
        Image.fromarray(_rgb(16, 16)).save(images / "a.png")
    if labels is None:
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps({"a.png": ["cat"]}))
    return main(["label", str(images), "--labels", str(labels), "--classes", "voc", "--weights", str(tiny_clip_path),
                 "--refine", "none", "--device", "cpu", "--quiet", *extra])


def test_invalid_labels_json_is_a_clear_error(tmp_path, tiny_clip_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _label(tmp_path, tiny_clip_path, "--out", str(tmp_path / "o"), labels=bad) == 2
    assert "bad.json: invalid JSON" in capsys.readouterr().err


def test_empty_class_file_is_a_clear_error(tmp_path, tiny_clip_path, capsys):
    from tag2mask.cli.main import main

    classes = tmp_path / "classes.txt"
    classes.write_text("# nothing\n")
    (tmp_path / "images").mkdir()
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels.json").write_text(json.dumps({"a.png": ["cat"]}))
    rc = main(["label", str(tmp_path / "images"), "--labels", str(tmp_path / "labels.json"), "--classes", str(classes),
               "--weights", str(tiny_clip_path), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "error:" in capsys.readouterr().err


def test_refuse_policy_reports_too_large(tmp_path, tiny_clip_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_rgb(100, 120)).save(images / "big.png")
    Image.fromarray(_rgb(16, 16)).save(images / "small.png")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"big.png": ["cat"], "small.png": ["dog"]}))
    out = tmp_path / "o"
    rc = _label(tmp_path, tiny_clip_path, "--out", str(out), "--max-pixels", "4096", "--max-pixels-policy", "refuse",
                images=images, labels=labels)
    assert rc == 1
    recs = {json.loads(l)["item"]: json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()}
    assert recs["small"]["status"] == "ok"
    assert recs["big"]["error_kind"] == "too_large"
    assert "big.png: image is 120x100 = 12,000 pixels, more than --max-pixels 4,096" in recs["big"]["error"]


def test_settings_guard_and_overwrite(tmp_path, tiny_clip_path, capsys):
    out = tmp_path / "o"
    assert _label(tmp_path, tiny_clip_path, "--out", str(out)) == 0
    assert _label(tmp_path, tiny_clip_path, "--out", str(out), "--bg-power", "2") == 2
    assert "different settings (bg_power)" in capsys.readouterr().err
    assert _label(tmp_path, tiny_clip_path, "--out", str(out), "--bg-power", "2", "--overwrite") == 0
    assert json.loads((out / "settings.json").read_text())["bg_power"] == 2.0
    assert list((out / "logs").glob("manifest.replaced-*.jsonl"))  # the old records are kept aside
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "ok"


def test_voc_item_with_broken_annotation(tmp_path, tiny_clip_path):
    from tag2mask.cli.main import main

    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "Annotations", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for name in ("good", "broken"):
        Image.fromarray(_rgb(16, 16)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "Annotations" / "good.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    (root / "Annotations" / "broken.xml").write_text("<annotation><object>")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("good\nbroken\n")
    out = tmp_path / "o"
    rc = main(["label", str(root), "--classes", "voc", "--weights", str(tiny_clip_path), "--out", str(out),
               "--refine", "none", "--device", "cpu", "--quiet"])
    assert rc == 1
    recs = {json.loads(l)["item"]: json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()}
    assert recs["good"]["status"] == "ok"
    assert recs["broken"]["error_kind"] == "load" and "broken.xml: cannot parse VOC annotation XML" in recs["broken"]["error"]
