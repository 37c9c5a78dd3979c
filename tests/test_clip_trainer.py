"""Tiny-CLIP trainer: smoke run, save/load round trip, AP/mAP on hand-made cases, batch targets."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.clip.loading import load_clip
from tag2mask.tiny_clip.config import TrainConfig
from tag2mask.tiny_clip.data import NUM_CONCEPTS, BatchSampler, ScenePool, concepts_from_caption
from tag2mask.tiny_clip.evaluation import average_precision, mean_average_precision
from tag2mask.tiny_clip.trainer import attention_affinity_loss, main, multi_positive_infonce

ASSET = Path(__file__).resolve().parents[1] / "tag2mask" / "assets" / "tiny_clip.safetensors"


def _tiny_cfg(out: Path, **kw) -> list[str]:
    args = {
        "--out": str(out), "--steps": "3", "--batch-size": "8", "--pool-size": "16", "--pool-workers": "1",
        "--image-size": "64", "--vision-width": "64", "--vision-layers": "2", "--text-layers": "1",
        "--embed-dim": "32", "--warmup": "1", "--log-every": "1", "--eval-every": "3", "--n-val": "8",
        "--device": "cpu", "--seed": "0", "--dense-eval": "4",
    }
    args.update(kw)
    return [x for kv in args.items() for x in kv] + ["--no-progress"]


def test_smoke_run_writes_log_and_loadable_weights(tmp_path):
    torch.set_num_threads(1)
    assert main(_tiny_cfg(tmp_path)) == 0
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses)
    val = list(csv.DictReader(open(tmp_path / "val_log.csv")))
    assert [int(r["iteration"]) for r in val] == [3] and 0.0 <= float(val[-1]["val_map"]) <= 1.0
    assert 0.0 <= json.loads((tmp_path / "summary.json").read_text())["val_map"] <= 1.0
    model = load_clip(tmp_path / "tiny_clip.safetensors")
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vision.width == 64 and model.config.vision.image_size == 64
    assert model.config.embed_dim == 32
    with torch.no_grad():
        emb = model.encode_image(torch.zeros(2, 3, 64, 64))
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()


def test_resumed_run_equals_uninterrupted_and_folder_is_guarded(tmp_path):
    """The tiny-CLIP trainer runs on the training engine: exact resume, no silent overwrite."""
    from tag2mask.tiny_clip.trainer import TinyClipTask, train
    from tag2mask.engine.loop import RunOptions
    from tag2mask.engine.loop import train as engine_train

    torch.set_num_threads(1)
    straight, part = tmp_path / "straight", tmp_path / "part"
    common = {"--steps": "4", "--eval-every": "0", "--dense-eval": "0", "--save-every": "2"}
    assert main(_tiny_cfg(straight, **common)) == 0
    with pytest.raises(ValueError, match="--resume"):  # an existing run folder is refused
        main(_tiny_cfg(straight, **common))
    cfg = TrainConfig(out=str(part), steps=4, batch_size=8, pool_size=16, pool_workers=1, image_size=64,
                      vision_width=64, vision_layers=2, text_layers=1, embed_dim=32, warmup=1, log_every=1,
                      eval_every=0, save_every=2, device="cpu", seed=0)
    # interrupted after 2 iterations, then resumed to the end
    engine_train(TinyClipTask(cfg, progress=False), RunOptions(out_dir=str(part), device="cpu", seed=0, stop_at=2,
                                                              ckpt_every=2, log_every=1, progress=False))
    train(cfg, progress=False, resume="auto")
    a = load_clip(straight / "tiny_clip.safetensors").state_dict()
    b = load_clip(part / "tiny_clip.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = list(csv.DictReader(open(straight / "train_log.csv")))
    rows_b = list(csv.DictReader(open(part / "train_log.csv")))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_average_precision_hand_made():
    # ranking: pos, neg, pos, neg -> precisions at positives 1/1 and 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 1])) == pytest.approx(1.0)
    assert average_precision(np.array([0.3, 0.2, 0.1]), np.array([0, 0, 1])) == pytest.approx(1 / 3)
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.1, 0.3, 0.6]])
    targets = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0]])
    # class 0: AP 1; class 1: positive ranked 2nd -> 1/2; class 2 has no positive -> skipped
    assert mean_average_precision(scores, targets) == pytest.approx(0.75)


def test_concepts_from_caption_plurals_and_stuff():
    hot = concepts_from_caption("two red crosses and a star over green grass")
    names = ["star", "ring", "cross", "heart", "triangle", "square", "disk", "crescent", "diamond", "arrow",
             "hexagon", "bolt", "grass", "water", "sky", "brick", "sand", "wood"]
    assert hot.shape == (NUM_CONCEPTS,)
    assert {names[i] for i in np.flatnonzero(hot)} == {"cross", "star", "grass"}


def test_pool_concepts_match_scene_labels_and_targets_are_consistent():
    pool = ScenePool(24, 64, workers=1, progress=False)
    from tag2mask.synth.scenes import generate_scene
    from tag2mask.synth.splits import seed_for

    for i in range(24):
        s = generate_scene(seed_for("train", i), 64)
        assert sorted(np.flatnonzero(pool.concepts[i, :12]) + 1) == sorted(s.labels)
    cfg = TrainConfig(batch_size=16, seed=1)
    batch = BatchSampler(pool, cfg, torch.device("cpu")).sample()
    pos = batch["positives"]
    assert pos.shape == (16, 16) and pos.diagonal().all()
    assert batch["images"].shape == (16, 3, 64, 64)
    assert batch["tokens"].dtype == torch.long and (batch["tokens"].argmax(1) > 0).all()


def test_multi_positive_infonce_reduces_to_clip_loss_with_identity():
    logits = torch.randn(5, 5)
    eye = torch.eye(5, dtype=torch.bool)
    ref = 0.5 * (
        torch.nn.functional.cross_entropy(logits, torch.arange(5))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(5))
    )
    assert multi_positive_infonce(logits, eye) == pytest.approx(float(ref), rel=1e-5)


def test_attention_affinity_loss_is_zero_at_the_target_and_positive_elsewhere():
    torch.manual_seed(0)
    dense = torch.randn(2, 6, 8)
    f = torch.nn.functional.normalize(dense, dim=-1)
    target = (f @ f.transpose(1, 2) / 0.1).softmax(-1)
    # attention maps with a CLS row/column whose patch block renormalises to the target
    att = torch.zeros(2, 7, 7)
    att[:, 0] = 1 / 7
    att[:, 1:, 0] = 0.3
    att[:, 1:, 1:] = 0.7 * target
    assert float(attention_affinity_loss([att], dense, 0.1)) == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full((2, 7, 7), 1 / 7)
    loss = attention_affinity_loss([att, uniform], dense, 0.1)
    assert float(loss) > 0.05
    # the target is a stop-gradient: only the attention receives gradient
    dense.requires_grad_(True)
    uniform.requires_grad_(True)
    attention_affinity_loss([uniform], dense, 0.1).backward()
    assert dense.grad is None and uniform.grad.abs().sum() > 0


def test_image_features_returns_attention_of_the_requested_blocks():
    from tag2mask.tiny_clip.evaluation import image_features
    from tag2mask.tiny_clip.trainer import build_model, model_config

    model = build_model(model_config(TrainConfig(image_size=32, patch_size=16, vision_width=64, vision_layers=3, embed_dim=16)))
    feats = image_features(model, torch.randn(2, 3, 32, 32), attention_from=1)
    assert len(feats["attentions"]) == 2
    assert all(a.shape == (2, 5, 5) for a in feats["attentions"])
    assert torch.allclose(feats["attentions"][-1].sum(-1), torch.ones(2, 5), atol=1e-5)
    assert "attentions" not in image_features(model, torch.randn(1, 3, 32, 32))


def test_smoke_run_with_attention_loss_logs_it(tmp_path):
    torch.set_num_threads(1)
    assert main(_tiny_cfg(tmp_path, **{"--w-attn": "1", "--attn-start": "0", "--dense-eval": "0"})) == 0
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert all(float(r["attn"]) > 0 for r in rows)


@pytest.mark.skipif(not ASSET.exists(), reason="shipped tiny CLIP weights not present")
def test_shipped_weights_load_and_fit_the_size_budget():
    assert ASSET.stat().st_size <= 15 * 1024 * 1024
    model = load_clip(ASSET)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vision.image_size == 224 and model.config.vision.patch_size == 16
