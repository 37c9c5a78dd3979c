"""Exports (palette PNG, COCO RLE JSON, overlays, HTML, atomic writes) and the eval command."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tag2mask.cli import eval_cmd
from tag2mask.io.atomic import atomic_path, atomic_write_bytes
from tag2mask.io.coco_rle import (counts_to_string, decode, encode, mask_bbox, masks_to_coco_json,
                                  rle_counts, string_to_counts)
from tag2mask.io.html_report import GridCell, GridRow, Table, bar_chart_svg, write_report
from tag2mask.io.palette import read_label_png, save_label_png, voc_palette
from tag2mask.io.visualize import cam_heatmap, overlay_image, save_cam_heatmap, save_overlay

# pycocotools calls np.array(copy=False) internally, deprecated under numpy 2: not our code
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FIXTURE = Path(__file__).parent / "data" / "clip_es"
INDEX = json.loads((FIXTURE / "index.json").read_text())


def test_voc_palette_known_colours() -> None:
    pal = voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[255].tolist() == [224, 224, 192]


def test_label_png_roundtrip(tmp_path: Path) -> None:
    lab = np.random.default_rng(0).integers(0, 21, (7, 9)).astype(np.uint8)
    lab[0, 0] = 255
    save_label_png(tmp_path / "l.png", lab)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), lab)
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(tmp_path / "bad.png", np.full((2, 2), 300))
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png.*mode RGB"):
        read_label_png(tmp_path / "rgb.png")
    with pytest.raises(FileNotFoundError, match="none.png"):
        read_label_png(tmp_path / "none.png")


def test_atomic_write_leaves_old_file_on_error(tmp_path: Path) -> None:
    p = tmp_path / "a" / "x.bin"
    atomic_write_bytes(p, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert [q.name for q in p.parent.iterdir()] == ["x.bin"]  # temp file removed


def _random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    masks = [rng.random((13, 17)) > t for t in (0.1, 0.5, 0.9)]
    masks += [np.zeros((5, 4), bool), np.ones((5, 4), bool), np.eye(6, dtype=bool)]
    big = np.zeros((300, 400), bool)
    big[50:250, 100:390] = True  # long runs: multi-character counts, deltas of both signs
    big[120:121, :] = True
    masks.append(big)
    return masks


def test_rle_matches_pycocotools() -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    for m in _random_masks():
        ours = encode(m)
        ref = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        assert ours["size"] == list(ref["size"])
        assert ours["counts"] == ref["counts"].decode("ascii")
        np.testing.assert_array_equal(decode(ours), m.astype(np.uint8))
        np.testing.assert_array_equal(mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()}), m)
        assert int(mask_api.area(ref)) == int(m.sum())
        assert mask_bbox(m) == pytest.approx(mask_api.toBbox(ref).tolist())


def test_rle_string_roundtrip_and_errors() -> None:
    for counts in ([0], [5, 3, 100000, 1, 2, 70000, 0, 1], [1, 2, 3, 40, 5, 600, 7]):
        assert string_to_counts(counts_to_string(counts)) == counts
    assert rle_counts(np.array([[1, 0], [1, 1]])) == [0, 2, 1, 1]
    with pytest.raises(ValueError, match="expected 6"):
        decode({"size": [2, 3], "counts": [1, 2]})


def test_coco_json_loads_in_pycocotools(tmp_path: Path) -> None:
    coco_mod = pytest.importorskip("pycocotools.coco")
    labels = [np.array([[0, 1, 1], [2, 2, 255]], np.uint8), np.zeros((4, 5), np.uint8)]
    labels[1][1:3, 2:4] = 3
    data = masks_to_coco_json(tmp_path / "seg.json", [("a.jpg", labels[0]), ("b.jpg", labels[1])],
                              ["cat", "dog", "cow"], category_ids=[17, 18, 21])
    assert len(data["annotations"]) == 3
    coco = coco_mod.COCO(str(tmp_path / "seg.json"))
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        lab = labels[img["id"] - 1]
        v = [17, 18, 21].index(ann["category_id"]) + 1
        np.testing.assert_array_equal(coco.annToMask(ann), (lab == v).astype(np.uint8))
        assert ann["area"] == int((lab == v).sum())
    with pytest.raises(ValueError, match="b.jpg.*exceeds"):
        masks_to_coco_json(tmp_path / "x.json", [("b.jpg", labels[1])], ["cat"])


def test_overlay_and_heatmap(tmp_path: Path) -> None:
    img = np.full((40, 60, 3), 100, np.uint8)
    lab = np.zeros((40, 60), np.uint8)
    lab[10:20, 10:30] = 8
    lab[0, 0] = 255
    ov = overlay_image(img, lab, ["c%d" % i for i in range(1, 21)])
    arr = np.asarray(ov)
    assert arr.shape[1] == 60 and arr.shape[0] > 40  # legend strip below
    np.testing.assert_array_equal(arr[0, 0], [100, 100, 100])  # ignore pixel untouched
    np.testing.assert_array_equal(arr[15, 15], np.rint(0.5 * 100 + 0.5 * voc_palette()[8]))
    assert np.asarray(overlay_image(img, np.zeros((40, 60), np.uint8))).shape == (40, 60, 3)
    with pytest.raises(ValueError, match="differs"):
        overlay_image(img, lab[:10])
    hm = np.asarray(cam_heatmap(img, np.linspace(0, 1, 60)[None].repeat(40, 0)))
    assert hm.shape == (40, 60, 3) and hm[0, 0, 2] > hm[0, 0, 0] and hm[0, -1, 0] > hm[0, -1, 2]
    save_overlay(tmp_path / "o.png", img, lab)
    save_cam_heatmap(tmp_path / "h.png", img, np.zeros((40, 60)))
    assert Image.open(tmp_path / "o.png").mode == "RGB" and (tmp_path / "h.png").is_file()


def test_report_page(tmp_path: Path) -> None:
    (tmp_path / "overlays").mkdir()
    page = write_report(
        tmp_path, "run <1>", warnings=["toy <model>"], notes=["a note"], summary={"mIoU": "50.0"},
        table=Table(["method", "mIoU (%)"], [["a<b", "50.0"]], numeric=("mIoU (%)",)),
        chart=("mIoU", [("a<b", 50.0), ("c", None)]),
        legend=[("cat", (64, 0, 0))],
        grid=(["input", "overlay"], [GridRow("img1", [GridCell(tmp_path / "images" / "a b.jpg"),
                                                      GridCell("overlays/a.png", "mIoU 50.0")], detail="tags: cat")]),
    )
    text = page.read_text()
    assert "run &lt;1&gt;" in text and "toy &lt;model&gt;" in text and "a&lt;b" in text
    assert "images/a%20b.jpg" in text and "overlays/a.png" in text and "mIoU 50.0" in text
    assert str(tmp_path) not in text  # links are relative
    assert text.count("<svg") == 1 and "<script" not in text and "rgb(64, 0, 0)" in text
    assert text.count("<tr>") == 2 + 2  # summary table: header + 1 row; grid: header + 1 row


def test_bar_chart_bars_are_proportional() -> None:
    import re

    svg = bar_chart_svg([("a", 25.0), ("b", 100.0), ("c", None), ("d", 150.0)], max_value=100.0, width=620)
    widths = [float(w) for w in re.findall(r"<rect [^>]*width='([\d.]+)'", svg)]
    assert len(widths) == 3  # no bar for a missing value
    assert widths[1] == pytest.approx(4 * widths[0]) and widths[2] == widths[1]  # clipped at the axis end
    assert ">–<" in svg and svg.startswith("<svg") and svg.endswith("</svg>")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tag2mask")
    eval_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_eval_cli_cams_reproduces_fixture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cams = tmp_path / "run" / "cams"
    cams.mkdir(parents=True)
    for e in INDEX["images"]:
        z = np.load(FIXTURE / e["arrays"])
        np.savez(cams / f"{e['name']}.npz", keys=z["keys"], cams=z["attn_highres"])
    rc = _main(["eval", str(tmp_path / "run"), "--cams", "--gt", str(FIXTURE / "gt"), "--classes", "voc",
                "--quiet", "--unseen", "cat", "15"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "best: p=1" in out and "hIoU" in out
    rep = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert rep["best_p"] == 1
    for p in ("p=1", "p=2"):
        assert rep["settings"][p]["Mean IoU"] == pytest.approx(INDEX["eval_cam"][p]["Mean IoU"], abs=1e-12)
    assert rep["unseen_ids"] == [8, 15]


def test_eval_cli_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    gt_a = np.array([[0, 0, 1, 1]], np.uint8)
    save_label_png(gt / "a.png", gt_a)
    save_label_png(pred / "a.png", np.array([[0, 1, 1, 1]], np.uint8))
    cls = tmp_path / "classes.txt"
    cls.write_text("thing,object\n")
    out = tmp_path / "res" / "e.json"
    assert _main(["eval", str(pred), "--gt", str(gt), "--classes", str(cls), "--out", str(out), "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert rep["class_names"] == ["background", "thing"]
    assert rep["scores"]["Mean IoU"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert rep["per_image_miou"]["a"] == pytest.approx((0.5 + 2 / 3) / 2)
    # missing GT is named
    save_label_png(pred / "zz.png", gt_a)
    assert _main(["eval", str(pred), "--gt", str(gt), "--classes", str(cls), "--quiet"]) == 2
    assert "zz.png" in capsys.readouterr().err
    shutil.rmtree(gt)
    assert _main(["eval", str(pred), "--gt", str(gt), "--quiet"]) == 2
    assert "ground-truth folder not found" in capsys.readouterr().err


def test_eval_html_report(tmp_path):
    """`tag2mask eval --html` writes overlays and an index.html with per-image mIoU, worst first."""
    import argparse

    from PIL import Image

    from tag2mask.cli import eval_cmd
    from tag2mask.io.palette import save_label_png

    images, pred, gt = tmp_path / "img", tmp_path / "pred", tmp_path / "gt"
    for d in (images, pred, gt):
        d.mkdir()
    rng = np.random.default_rng(0)
    for stem, shift in (("good", 0), ("bad", 8)):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{stem}.jpg")
        lab = np.zeros((32, 32), np.uint8)
        lab[8:24, 8:24] = 15
        save_label_png(gt / f"{stem}.png", lab)
        save_label_png(pred / f"{stem}.png", np.roll(lab, shift, axis=1))
    parser = argparse.ArgumentParser()
    eval_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", str(pred), "--gt", str(gt), "--classes", "voc", "--quiet",
                              "--html", str(tmp_path / "report"), "--images", str(images)])
    assert args.func(args) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.index("bad") < page.index("good")  # worst image first
    assert (tmp_path / "report" / "overlays" / "bad.png").is_file()
    assert (tmp_path / "report" / "gt_overlays" / "good.png").is_file()
    assert "ground truth" in page and "mIoU 100.0" in page and "IoU (%) per class" in page
    args = parser.parse_args(["eval", str(pred), "--gt", str(gt), "--quiet", "--html", str(tmp_path / "r2")])
    assert args.func(args) == 2  # --html without --images is a clear error
