"""CorrCLIP's region machinery, name files, DINO loading and MetaCLIP-style checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.clip.loading import load_clip
from tag2mask.methods.corrclip.names import read_corrclip_names
from tag2mask.methods.corrclip.regions import (
    RegionFolder, _components, correct_labels, merge_regions, paint_by_area, scope_mask,
)
from tag2mask.methods.corrclip.model import spatial_block_range
from tag2mask.models.dino import DinoViT, DinoWeightsError, dino_to_hf, hf_to_dino, load_dino
from tag2mask.proposals.base import MaskProposals


def _dbscan_min_samples_one(dist: np.ndarray, eps: float) -> list[int]:
    """DBSCAN (min_samples 1) by its definition: visit points in order, grow clusters breadth-first."""
    labels = [-1] * len(dist)
    cluster = 0
    for start in range(len(dist)):
        if labels[start] != -1:
            continue
        labels[start], queue = cluster, [start]
        while queue:
            i = queue.pop(0)
            for j in np.nonzero(dist[i] <= eps)[0]:
                if labels[j] == -1:
                    labels[j] = cluster
                    queue.append(j)
        cluster += 1
    return labels


def test_components_are_dbscan_clusters_in_discovery_order():
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        f = torch.nn.functional.normalize(torch.randn(12, 3, generator=gen, dtype=torch.float64), dim=1)
        dist = (f @ f.T).max() - f @ f.T
        assert _components(dist <= 0.5).tolist() == _dbscan_min_samples_one(dist.numpy(), 0.5)


def test_components_match_sklearn_dbscan():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        f = torch.nn.functional.normalize(torch.randn(9, 4, generator=gen, dtype=torch.float64), dim=1)
        dist = (f @ f.T).max() - f @ f.T
        ref = sklearn_cluster.DBSCAN(metric="precomputed", eps=0.6, min_samples=1).fit_predict(dist.numpy())
        assert _components(dist <= 0.6).tolist() == ref.tolist()


def test_merge_keeps_the_smallest_id_and_relabels_the_rest():
    region = torch.tensor([[0, 0, 3, 3], [5, 5, 7, 7]])
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feats = torch.stack([a, a, b, b, b, b, a, a])  # regions 3 and 5 alike, 7 like 0
    merged, labels = merge_regions(region, feats, eps=0.2)
    assert labels == [0, 0, 1]
    assert merged.tolist() == [[0, 0, 10000, 10000], [10000, 10000, 10001, 10001]]
    two = torch.tensor([[0, 0], [4, 4]])
    assert torch.equal(merge_regions(two, feats[:4])[0], two)  # two ids: nothing merged


def test_scope_and_map_correction():
    region = torch.tensor([0, 0, 9, 9, 12])
    sim = torch.eye(5)
    sim[0, 4] = sim[4, 0] = 0.9
    allowed = scope_mask(region, sim)
    assert allowed[2, 3] and allowed[3, 2] and not allowed[2, 4]  # inside region 9, not across
    assert allowed[0, 4] and allowed[0, 0] and not allowed[0, 1]  # unsegmented: only above-mean similarity
    label = torch.tensor([[1, 2, 2], [1, 1, 3]])
    regions = torch.tensor([[0, 5, 5], [0, 5, 7]])
    out = correct_labels(label, regions, 4)
    assert out.tolist() == [[1, 2, 2], [1, 2, 3]]  # region 5: mode 2; region 0 untouched
    tie = correct_labels(torch.tensor([[2, 3, 1]]), torch.tensor([[0, 4, 4]]), 4)
    assert tie.tolist() == [[2, 1, 1]]  # ties -> the smallest label (torch.mode on CPU)


def test_paint_by_area_puts_larger_masks_over_smaller_ones():
    small = np.zeros((4, 4), bool)
    small[0, 0:2] = True
    big = np.zeros((4, 4), bool)
    big[0:2, :] = True
    region = paint_by_area(MaskProposals.from_masks(np.stack([big, small])))
    assert region[0, 0] == 2 and region[1, 3] == 2 and region[3, 3] == 0  # big (id 2) painted last


def test_region_folder_reads_npz_png_and_rle(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    ids = np.arange(48).reshape(6, 8) % 5
    np.savez(tmp_path / "a.npz", instance_mask=ids.astype(np.int16))
    Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "b.png")
    folder = RegionFolder(tmp_path)
    assert np.array_equal(folder(rgb, "a"), ids) and np.array_equal(folder(rgb, "b"), ids)
    with pytest.raises(FileNotFoundError, match="no region map for 'c'"):
        folder(rgb, "c")
    from tag2mask.proposals.rle_files import write_proposals_json

    write_proposals_json(tmp_path / "d.json", MaskProposals.from_masks(ids[None] == 3))
    assert np.array_equal(folder(rgb, "d"), (ids == 3).astype(np.int64))


def test_corrclip_names_are_read_as_they_are(tmp_path):
    path = tmp_path / "cls.txt"
    path.write_text("sky; wall;  tree\naeroplane\nbus\n", encoding="utf-8")
    vocab = read_corrclip_names(path)
    assert vocab.background == ("sky", "wall", "tree") and vocab.names == ("aeroplane", "bus")
    assert read_corrclip_names(path, first_line_background=False).names == ("sky", "aeroplane", "bus")


def test_spatial_blocks_follow_the_official_rule():
    assert list(spatial_block_range(12)) == [5, 6, 7, 8, 9]
    assert list(spatial_block_range(24)) == list(range(10, 22))
    assert list(spatial_block_range(6)) == [2, 3]


def _tiny_dino_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DinoViT(embed_dim=24, depth=2, num_heads=2, patch_size=8, pretrain_grid=4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_dino_layout_round_trip_and_clear_errors(tmp_path):
    sd = _tiny_dino_state()
    assert {k: torch.equal(v, hf_to_dino(dino_to_hf(sd))[k]) for k, v in sd.items()} == {k: True for k in sd}
    torch.save(sd, tmp_path / "d.pth")
    with pytest.raises(DinoWeightsError, match="number of attention heads"):
        load_dino(tmp_path / "d.pth")  # width 24: the 64-dim rule does not apply
    model = load_dino(tmp_path / "d.pth", num_heads=2)
    x = torch.randn(1, 3, 24, 40)
    feats, grid = model.last_qk(x)
    assert feats.shape == (1, 15, 24) and grid == (3, 5)
    broken = dict(sd)
    del broken["norm.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(DinoWeightsError, match="norm.weight"):
        load_dino(tmp_path / "broken.pth", num_heads=2)
    torch.save({"not": "tensors"}, tmp_path / "junk.pth")
    with pytest.raises(DinoWeightsError):
        load_dino(tmp_path / "junk.pth", num_heads=2)
    with pytest.raises(DinoWeightsError, match="no such DINO"):
        load_dino(tmp_path / "missing.pth")


def test_named_dino_is_not_downloaded_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_HOME", str(tmp_path))
    monkeypatch.delenv("TAG2MASK_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(DinoWeightsError, match="--allow-download"):
        load_dino("dino_vitb8")


def test_an_open_clip_checkpoint_loads_with_quickgelu(tiny_clip_path, tmp_path):
    """MetaCLIP's ViT-B-16-quickgelu files are open_clip state dicts (possibly wrapped, DDP-prefixed)."""
    ref = load_clip(tiny_clip_path)
    wrapped = {"state_dict": {f"module.{k}": v.clone() for k, v in ref.state_dict().items()}, "epoch": 32}
    path = tmp_path / "metaclip_b16_fullcc2.5b.pt"
    torch.save(wrapped, path)
    model = load_clip(path)
    act = type(model.visual.blocks[0].mlp.gelu).__name__
    assert act == "QuickGELU"
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model.encode_image(x), ref.encode_image(x))


def test_cli_corrclip_with_superpixels_and_checks(tmp_path, tiny_clip_path, capsys):
    pytest.importorskip("skimage")
    from tag2mask.cli.main import main

    sd = _tiny_dino_state()
    hf = tmp_path / "dino_hf"
    hf.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dino_to_hf(sd).items()}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"model_type": "vit", "num_attention_heads": 2}))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    base = ["segment", str(tmp_path / "a.png"), "--classes", "cat, car; background: sky, wall", "--weights",
            str(tiny_clip_path), "--method", "corrclip", "--short-side", "112"]
    assert main(base + ["--dino", str(hf), "--regions", "slic", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["images"][0]["status"] == "ok" and record["settings"]["regions"] == "slic"
    assert main(base + ["--dino", str(hf), "--out", str(tmp_path / "o2")]) == 2
    assert "--regions" in capsys.readouterr().err
    assert main(base + ["--dino", str(hf), "--regions", "sam", "--out", str(tmp_path / "o3")]) == 2
    assert "--sam-weights" in capsys.readouterr().err
    assert main(base + ["--dino", str(hf), "--regions", "slic", "--pamr", "--out", str(tmp_path / "o4")]) == 2
    assert "--pamr" in capsys.readouterr().err
    assert main(base + ["--dino", str(hf), "--regions", "slic", "--sam-weights", "x", "--out", str(tmp_path / "o5")]) == 2
    assert "--sam-weights does not apply to --regions slic" in capsys.readouterr().err


def test_cli_corrclip_with_sam_regions(tmp_path, tiny_clip_path):
    pytest.importorskip("transformers")
    from tiny_sam import tiny_sam

    from tag2mask.cli.main import main

    tiny_sam().save_pretrained(tmp_path / "sam")
    sd = _tiny_dino_state()
    torch.save(sd, tmp_path / "dino.pth")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    argv = ["segment", str(tmp_path / "a.png"), "--classes", "cat, car", "--weights", str(tiny_clip_path),
            "--method", "corrclip", "--short-side", "112", "--dino", str(tmp_path / "dino.pth"), "--dino-heads", "2",
            "--regions", "sam", "--sam-weights", str(tmp_path / "sam"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["images"][0]["status"] == "ok"
    assert record["settings"]["regions"] == "sam" and record["settings"]["dino_heads"] == 2
    assert len(record["settings"]["dino_weights"]) == 16
