"""Mask proposals: pure-torch NMS, RLE files, superpixels, the SAM generator (tiny random SamModel
and a geometric stand-in), weight loading."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tag2mask.clip.loading import WeightsError, WeightsNotFoundError
from tag2mask.io import coco_rle
from tag2mask.proposals.base import MaskProposals, ProposalError
from tag2mask.proposals.filters import level_overlap_filter, overlap_counts, remove_small_regions
from tag2mask.proposals.nms import batched_nms, box_iou, masks_to_boxes, nms
from tag2mask.proposals.rle_files import RLEFolderProposals, read_proposals_json, write_proposals_json

# ------------------------------------------------------------------------------------------- NMS


def _iou_direct(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _nms_direct(boxes, scores, groups, thr):
    """O(n^2) reference: visit by decreasing score, keep a box unless a kept box of its group overlaps > thr."""
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(groups[j] != groups[i] or _iou_direct(boxes[i], boxes[j]) <= thr for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.7])
def test_batched_nms_matches_the_direct_algorithm(seed, thr):
    rng = np.random.default_rng(seed)
    n = 60
    xy = rng.uniform(0, 50, size=(n, 2))
    wh = rng.uniform(1, 30, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct
    groups = rng.integers(0, 3, size=n)
    ours = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), thr).tolist()
    assert ours == _nms_direct(boxes.tolist(), scores.tolist(), groups.tolist(), thr)
    single = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).tolist()
    assert single == _nms_direct(boxes.tolist(), scores.tolist(), [0] * n, thr)


def test_nms_edge_cases():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    # exact ties are visited in index order
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    assert nms(boxes, torch.tensor([1.0, 1.0, 0.5]), 0.5).tolist() == [0, 2]
    iou = box_iou(boxes, boxes)
    assert torch.allclose(iou.diagonal(), torch.ones(3)) and iou[0, 2] == 0
    empty = torch.zeros(2, 4)
    assert not box_iou(empty, empty).isnan().any()


def test_masks_to_boxes():
    m = torch.zeros(3, 6, 8, dtype=torch.bool)
    m[0, 1:3, 2:5] = True
    m[1, 5, 7] = True
    assert masks_to_boxes(m).tolist() == [[2, 1, 4, 2], [7, 5, 7, 5], [0, 0, 0, 0]]


def test_overlap_counts_and_small_regions():
    rng = np.random.default_rng(1)
    a, b = rng.random((4, 9, 7)) > 0.5, rng.random((3, 9, 7)) > 0.6
    direct = np.array([[int((x & y).sum()) for y in b] for x in a])
    assert np.array_equal(overlap_counts(a, b), direct)
    mask = np.zeros((10, 10), bool)
    mask[1:7, 1:7] = True
    mask[4, 4] = False  # a one-pixel hole
    mask[9, 9] = True  # a one-pixel island (8-connected to nothing)
    filled, changed = remove_small_regions(mask, 3, "holes")
    assert changed and filled[4, 4] and filled[9, 9] and filled.sum() == mask.sum() + 1
    cleaned, changed = remove_small_regions(filled, 3, "islands")
    assert changed and not cleaned[9, 9] and cleaned[1:7, 1:7].all() and cleaned.sum() == 36
    assert not remove_small_regions(cleaned, 3, "holes")[1]
    tiny = np.zeros((5, 5), bool)
    tiny[0, 0] = tiny[4, 4] = True
    tiny[3, 4] = True
    kept, changed = remove_small_regions(tiny, 10, "islands")  # all small: the largest stays
    assert changed and kept.sum() == 2 and kept[4, 4] and not kept[0, 0]


# -------------------------------------------------------------------------------------- RLE files


def _random_proposals(seed=0, s=5, h=13, w=17) -> MaskProposals:
    rng = np.random.default_rng(seed)
    masks = rng.random((s, h, w)) > 0.6
    masks[0, 0, 0] = True  # counts starting with a 1-run
    masks[1] = False
    masks[1, h - 1, w - 1] = True  # a mask ending on the last pixel
    return MaskProposals.from_masks(masks, rng.integers(0, 3, s), rng.random(s).astype(np.float32))


@pytest.mark.parametrize("compressed", [True, False])
def test_proposal_json_round_trip(tmp_path, compressed):
    props = _random_proposals()
    path = tmp_path / "img.json"
    write_proposals_json(path, props, compressed=compressed)
    data = json.loads(path.read_text())
    counts = data["annotations"][0]["segmentation"]["counts"]
    assert isinstance(counts, str) if compressed else isinstance(counts, list)
    back = read_proposals_json(path, image_size=props.image_size)
    assert np.array_equal(back.masks, props.masks)
    assert np.array_equal(back.levels, props.levels) and np.array_equal(back.areas, props.areas)
    assert np.allclose(back.scores, props.scores)


def test_reads_sam_amg_output_and_pycocotools_rle(tmp_path):
    pycoco = pytest.importorskip("pycocotools.mask")
    props = _random_proposals(seed=3)
    anns = []
    for m in props.masks:
        rle = pycoco.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        # the fields SAM's amg.py writes (no level)
        anns.append({"segmentation": rle, "area": int(m.sum()), "bbox": coco_rle.mask_bbox(m),
                     "predicted_iou": 0.9, "point_coords": [[1.0, 2.0]], "stability_score": 0.95,
                     "crop_box": [0, 0, m.shape[1], m.shape[0]]})
    path = tmp_path / "amg.json"
    path.write_text(json.dumps(anns))
    back = read_proposals_json(path)
    assert np.array_equal(back.masks, props.masks) and not back.levels.any()
    # and our encoder writes what pycocotools decodes
    for m in props.masks:
        ours = coco_rle.encode(m)
        assert np.array_equal(pycoco.decode({"size": ours["size"], "counts": ours["counts"].encode()}), m)


def test_empty_masks_are_dropped_and_area_field_is_used(tmp_path):
    m = np.zeros((4, 5), bool)
    full = np.ones((4, 5), bool)
    anns = [{"segmentation": coco_rle.encode(m)}, {"segmentation": coco_rle.encode(full), "area": 7}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(anns))
    back = read_proposals_json(path)
    assert len(back) == 1 and back.areas.tolist() == [7]


BAD_FILES = {
    "not json": ("{not json", "not a readable JSON"),
    "object without annotations": (json.dumps({"masks": []}), "annotations"),
    "no segmentation": (json.dumps([{"area": 3}]), "no 'segmentation'"),
    "polygon": (json.dumps([{"segmentation": [[0, 0, 1, 0, 1, 1]]}]), "polygon"),
    "counts do not add up": (json.dumps([{"segmentation": {"size": [4, 5], "counts": [3, 4]}}]), "invalid RLE"),
    "bad characters": (json.dumps([{"segmentation": {"size": [4, 5], "counts": "\x7f\x7f"}}]), "invalid RLE"),
    "wrong size": (json.dumps([{"segmentation": {"size": [3, 5], "counts": [15]}}]), "but the image is 4x5"),
    "negative area": (json.dumps([{"segmentation": {"size": [4, 5], "counts": [0, 20]}, "area": -1}]), "non-negative"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_proposal_files_are_named_and_explained(tmp_path, name):
    text, message = BAD_FILES[name]
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProposalError, match=message) as err:
        read_proposals_json(path, image_size=(4, 5))
    assert str(path) in str(err.value)


def test_folder_source(tmp_path):
    props = _random_proposals(h=6, w=9)
    (tmp_path / "sub").mkdir()
    write_proposals_json(tmp_path / "sub" / "x.json", props)
    source = RLEFolderProposals(tmp_path)
    got = source(np.zeros((6, 9, 3), np.uint8), "sub/x")
    assert np.array_equal(got.masks, props.masks)
    with pytest.raises(FileNotFoundError, match="no proposal file"):
        source(np.zeros((6, 9, 3), np.uint8), "missing")
    with pytest.raises(ProposalError, match="but the image is"):
        source(np.zeros((7, 9, 3), np.uint8), "sub/x")
    with pytest.raises(FileNotFoundError):
        RLEFolderProposals(tmp_path / "nope")


# ------------------------------------------------------------------------------------ superpixels


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_superpixels_partition_the_image(method):
    pytest.importorskip("skimage")
    from tag2mask.proposals.superpixels import SuperpixelProposals, SuperpixelSettings

    rng = np.random.default_rng(0)
    image = np.zeros((40, 50, 3), np.uint8)
    image[:, 25:] = 200
    image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
    props = SuperpixelProposals(method, SuperpixelSettings(n_segments=12, scale=50, min_size=20))(image, "k")
    assert len(props) >= 2 and props.image_size == (40, 50)
    assert np.array_equal(props.masks.sum(axis=0), np.ones((40, 50)))  # every pixel in exactly one segment
    assert not props.levels.any() and np.array_equal(props.areas, props.masks.reshape(len(props), -1).sum(1))
    # the colour edge is respected: no segment straddles it much
    left = props.masks[:, :, :25].reshape(len(props), -1).sum(1) / props.areas
    assert np.all((left < 0.2) | (left > 0.8))


def test_superpixels_reject_unknown_method():
    pytest.importorskip("skimage")
    from tag2mask.proposals.superpixels import SuperpixelProposals

    with pytest.raises(ValueError, match="slic"):
        SuperpixelProposals("watershed")


# ----------------------------------------------------------------------------------------- SAM

transformers = pytest.importorskip("transformers")

from tag2mask.proposals.sam import (  # noqa: E402
    SAM_PRESETS,
    SamMaskGenerator,
    crop_boxes,
    load_sam,
    point_grid,
    stability_scores,
)
from tiny_sam import DiskSam, tiny_sam  # noqa: E402


def _image(h=48, w=72, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_crop_boxes_and_point_grid():
    boxes, layers = crop_boxes(48, 72, 1, 512 / 1500)
    assert boxes[0] == [0, 0, 72, 48] and layers == [0, 1, 1, 1, 1]
    for x0, y0, x1, y1 in boxes[1:]:
        assert 0 <= x0 < x1 <= 72 and 0 <= y0 < y1 <= 48
    # the four crops cover the image and overlap
    cover = np.zeros((48, 72), int)
    for x0, y0, x1, y1 in boxes[1:]:
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1 and cover.max() == 4
    g = point_grid(4)
    assert g.shape == (16, 2) and np.allclose(g[0], [0.125, 0.125]) and np.allclose(g[1], [0.375, 0.125])
    logits = torch.tensor([[[2.0, 0.5, -0.5, -2.0]]])
    assert stability_scores(logits, 0.0, 1.0).item() == pytest.approx(1 / 3)  # |> 1| / |> -1|


def test_tiny_sam_model_runs_end_to_end():
    model = tiny_sam()
    assert sum(p.numel() for p in model.parameters()) < 20_000
    settings = replace(SAM_PRESETS["fma"], points_per_side=6, pred_iou_thresh=-1e9, stability_score_thresh=0.0,
                       min_mask_region_area=5)
    props = SamMaskGenerator(model, settings).generate(_image())
    assert len(props) >= 1 and props.image_size == (48, 72)
    assert set(props.levels.tolist()) <= {0, 1, 2}
    assert (props.areas > 0).all() and np.array_equal(props.areas, props.masks.reshape(len(props), -1).sum(1))
    again = SamMaskGenerator(model, settings).generate(_image())
    assert np.array_equal(again.masks, props.masks)
    with pytest.raises(ValueError, match="uint8"):
        SamMaskGenerator(model, settings).generate(_image().astype(np.float32))


def _disk_run(**overrides):
    settings = replace(SAM_PRESETS["fma"], points_per_side=8, **overrides)
    return SamMaskGenerator(DiskSam(), settings).generate(_image())


def test_level_aware_thresholds_and_filter():
    # the stand-in predicts IoU 0.9 / 0.8 / 0.8 for levels 0 / 1 / 2; the FMA threshold is 0.86
    stock = _disk_run(score_thresh_offset=(0.0, 0.0, 0.0), level_overlap_thresh=None)
    assert set(stock.levels.tolist()) == {0}
    fma = _disk_run(level_overlap_thresh=None)  # +0.1 for whole masks lets level 2 through
    assert set(fma.levels.tolist()) == {0, 2}
    # the level-overlap filter is applied last, on exactly what the generator had produced
    filtered = _disk_run()
    assert np.array_equal(filtered.masks, fma.select(level_overlap_filter(fma, 0.3)).masks)
    assert list(filtered.levels) == sorted(filtered.levels, reverse=True)


def test_nms_score_offset_lets_whole_masks_win():
    # with equal IoUs, the +1 NMS score of level 2 decides which of overlapping masks survive
    base = dict(level_overlap_thresh=None, crop_n_layers=0, min_mask_region_area=0)
    plain = replace(SAM_PRESETS["fma"], points_per_side=8, score_nms_offset=(0.0, 0.0, 0.0), box_nms_thresh=0.0, **base)
    boosted = replace(plain, score_nms_offset=(0.0, 0.0, 1.0))
    sam = DiskSam(ious=(0.95, 0.95, 0.95))
    first = SamMaskGenerator(sam, plain).generate(_image())
    second = SamMaskGenerator(sam, boosted).generate(_image())
    assert first.levels[0] == 0 and second.levels[0] == 2  # the top-scoring box differs


def test_outputs_do_not_depend_on_the_point_batch():
    a = _disk_run(points_per_batch=64)
    b = _disk_run(points_per_batch=7)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.levels, b.levels)


def test_final_masks_do_not_overlap_above_the_nms_threshold():
    props = _disk_run(level_overlap_thresh=None)
    boxes = masks_to_boxes(torch.from_numpy(props.masks)).float()
    iou = box_iou(boxes, boxes)
    iou.fill_diagonal_(0)
    assert iou.max() <= SAM_PRESETS["fma"].crop_nms_thresh


def test_load_sam_from_a_folder_and_offline_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("TAG2MASK_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_sam(seed=1)
    model.save_pretrained(tmp_path / "sam")
    loaded = load_sam(tmp_path / "sam")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(WeightsNotFoundError, match="--allow-download"):
        load_sam("facebook/sam-vit-this-does-not-exist")
    (tmp_path / "sam_vit_h.pth").write_bytes(b"x")
    with pytest.raises(WeightsError, match="converted"):
        load_sam(tmp_path / "sam_vit_h.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        load_sam(tmp_path / "empty")
