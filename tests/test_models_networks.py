"""Every registered segmentation network, built tiny: shapes, gradients, the ignore label, frozen parts.

The loss checks compare ``training_loss`` with a direct log-softmax computation over the labelled
pixels only, so a network that let ignored pixels into its loss (or mis-resized its logits) fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.models import SEGMENTERS, build_segmenter, segmentation_cross_entropy
from tag2mask.models.mask2former import semantic_targets

NUM_CLASSES = 5
PER_PIXEL = ["deeplab-v2", "deeplab-v3plus", "segformer", "upernet", "clip-decoder"]


def tiny_clip() -> CLIP:
    torch.manual_seed(1)
    cfg = CLIPConfig(embed_dim=16, vision=VisionConfig(width=32, layers=3, heads=2, image_size=32, patch_size=16),
                     text=TextConfig(width=16, layers=1, heads=1))
    return CLIP(cfg).eval()


def build(name: str, **kw):
    torch.manual_seed(0)
    if name == "clip-decoder":
        kw.setdefault("clip_model", tiny_clip())
    return build_segmenter(name, NUM_CLASSES, tiny=True, **kw)


def batch(h: int = 64, w: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, h, w, generator=g)
    target = torch.randint(0, NUM_CLASSES, (2, h, w), generator=g)
    target[0, : h // 3] = 255
    target[1, :, w // 2 :] = 255
    return images, target


def direct_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over labelled pixels of -log softmax(logits)[label], logits bilinearly upsampled to the target."""
    up = F.interpolate(logits.double(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    logp = up.log_softmax(dim=1)
    valid = target != 255
    picked = logp.permute(0, 2, 3, 1)[valid]  # (N, C)
    return -picked[torch.arange(picked.shape[0]), target[valid]].mean()


def test_registry_lists_every_network():
    assert set(SEGMENTERS) == {"deeplab-v2", "deeplab-v3plus", "segformer", "upernet", "mask2former", "clip-decoder"}
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("deeplab-v9", 3)
    with pytest.raises(ValueError, match="unknown option"):
        build_segmenter("deeplab-v2", 3, tiny=True, aspp_rates=(1, 2))


@pytest.mark.parametrize("name", sorted(SEGMENTERS))
def test_forward_shape_and_backward(name):
    model = build(name)
    images, target = batch(64, 48)
    logits = model(images)
    s = model.output_stride
    assert logits.shape[:2] == (2, NUM_CLASSES)
    assert abs(logits.shape[-2] - 64 / s) <= 1 and abs(logits.shape[-1] - 48 / s) <= 1
    losses = model.training_loss(images, target)
    assert torch.isfinite(losses["loss"]) and losses["loss"].requires_grad
    losses["loss"].backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable) > 0.8 * len(trainable)
    groups = model.parameter_groups()
    assert sum(len(v) for v in groups.values()) == len(trainable)
    assert groups["head"], "the head must be a separate parameter group"
    assert len(model.normalization.mean) == 3 and len(model.normalization.std) == 3


@pytest.mark.parametrize("name", PER_PIXEL)
def test_loss_is_direct_ce_over_labelled_pixels(name):
    model = build(name).eval()  # eval: dropout off, so two forwards agree
    images, target = batch()
    with torch.no_grad():
        got = model.training_loss(images, target)["ce"]
        want = direct_ce(model(images), target)
    assert math.isclose(float(got), float(want), rel_tol=1e-5)


@pytest.mark.parametrize("name", PER_PIXEL)
def test_ignored_pixels_never_reach_the_gradient(name):
    """The loss gradient w.r.t. the logits is zero wherever the upsampled logits only reach ignored pixels."""
    model = build(name).eval()
    images, target = batch()
    target[:] = 255
    target[:, -8:, -8:] = 1  # only the bottom-right corner is labelled
    logits = model(images).detach().requires_grad_(True)
    loss = segmentation_cross_entropy(logits, target)
    loss.backward()
    # logits pixels whose bilinear footprint lies entirely in the ignored area get no gradient
    s = model.output_stride
    far = logits.grad[:, :, : max(1, (64 - 8) // s - 2), :]
    assert far.abs().max() == 0
    assert logits.grad.abs().sum() > 0


def test_all_ignored_target_gives_zero_loss_not_nan():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 16, 16), 255, dtype=torch.long)
    loss = segmentation_cross_entropy(logits, target)
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad.abs().max() == 0


def test_ignored_logits_may_be_anything():
    logits = torch.randn(1, 3, 8, 8)
    target = torch.randint(0, 3, (1, 8, 8))
    target[0, :4] = 255
    base = segmentation_cross_entropy(logits, target)
    poisoned = logits.clone()
    poisoned[0, :, :4] = float("nan")
    assert torch.equal(segmentation_cross_entropy(poisoned, target), base)


def test_loss_switches_of_the_official_recipes():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    target = torch.randint(0, 4, (2, 11, 11), generator=g)
    target[:, :3] = 255
    # mmseg 0.20 (MaskCLIP+): the sum over labelled pixels divided by all pixels
    valid = target != 255
    full = segmentation_cross_entropy(logits, target)
    over_all = segmentation_cross_entropy(logits, target, average_over_ignored=True)
    assert math.isclose(float(over_all), float(full) * int(valid.sum()) / target.numel(), rel_tol=1e-6)
    # deeplab-pytorch (CLIP-ES): labels downsampled PIL-NEAREST style, source index floor((i + 0.5) * 11 / 5)
    src = np.floor((np.arange(5) + 0.5) * 11 / 5).astype(int)
    small = target[:, src][:, :, src]
    low = segmentation_cross_entropy(logits, target, at_logit_resolution=True)
    assert math.isclose(float(low), float(F.cross_entropy(logits, small, ignore_index=255)), rel_tol=1e-6)


def test_bad_target_values_are_named():
    logits = torch.randn(1, 3, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        segmentation_cross_entropy(logits, target)
    with pytest.raises(TypeError, match="int64"):
        segmentation_cross_entropy(logits, target.int())


def test_deeplab_msc_training_sums_scales_and_max():
    model = build("deeplab-v2", msc_scales=(0.5, 0.75), loss_at_logit_resolution=True).eval()
    images, target = batch(48, 48)
    losses = model.training_loss(images, target)
    assert set(losses) == {"ce", "ce_x0.5", "ce_x0.75", "ce_max", "loss"}
    total = sum(float(losses[k]) for k in ("ce", "ce_x0.5", "ce_x0.75", "ce_max"))
    assert math.isclose(float(losses["loss"].detach()), total, rel_tol=1e-6)
    with torch.no_grad():
        full = model._single_scale(images)
        half = F.interpolate(model._single_scale(F.interpolate(images, scale_factor=0.5, mode="bilinear")),
                             size=full.shape[-2:], mode="bilinear", align_corners=False)
        out = model(images)
    assert torch.all(out >= full - 1e-6) and torch.all(out >= half - 1e-6)


def test_norm_eval_freezes_backbone_batchnorm():
    model = build("deeplab-v2", norm_eval=True).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = [m.running_mean.clone() for m in bns]
    model.training_loss(*batch())["loss"].backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    trained = build("deeplab-v2", norm_eval=False).train()
    assert all(m.training for m in trained.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_clip_decoder_keeps_clip_frozen_and_in_eval_mode():
    model = build("clip-decoder").train()
    assert not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.training_loss(*batch())["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.parameter_groups()["backbone"] == []
    assert model.output_stride == 16


def test_clip_decoder_needs_weights_or_a_model():
    with pytest.raises(ValueError, match="clip_weights"):
        build_segmenter("clip-decoder", 3, tiny=True)


def test_mask2former_targets_exclude_ignore():
    target = torch.tensor([[[0, 3, 255], [3, 3, 255]], [[255, 255, 255], [255, 255, 255]]])
    masks, classes = semantic_targets(target)
    assert classes[0].tolist() == [0, 3] and classes[1].numel() == 0
    assert masks[0].shape == (2, 2, 3) and masks[1].shape == (0, 2, 3)
    assert masks[0][:, :, 2].sum() == 0  # ignored pixels are in no mask
    assert torch.equal(masks[0][1], (target[0] == 3).float())


def test_mask2former_scores_are_the_query_mixture():
    model = build("mask2former").eval()
    images, target = batch(64, 64)
    with torch.no_grad():
        out = model.hf(pixel_values=images)
        probs = out.class_queries_logits.softmax(-1)[..., :-1].double()
        masks = out.masks_queries_logits.sigmoid().double()
        direct = torch.zeros(2, NUM_CLASSES, *masks.shape[-2:], dtype=torch.float64)
        for q in range(masks.shape[1]):
            direct += probs[:, q, :, None, None] * masks[:, q, None]
        got = model(images).exp().double()
    assert torch.allclose(got, direct.clamp_min(1e-8), rtol=1e-5, atol=1e-7)
    # an image whose pixels are all ignored still trains (no class targets, finite loss)
    target[1] = 255
    loss = model.train().training_loss(images, target)["loss"]
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="does not support a text-embedding head"):
        build_segmenter("mask2former", 4, tiny=True, text_embeddings=torch.randn(4, 8))


@pytest.fixture(scope="module")
def gloo_group(tmp_path_factory):
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("ddp") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name,kw", [(n, {}) for n in sorted(SEGMENTERS)] + [("upernet", {"backbone": "tiny-swin"})])
def test_loss_through_ddp_forward_uses_every_trainable_parameter(name, kw, gloo_group):
    """``DDP(model)(images, target)`` gives the loss dict; two steps without ``find_unused_parameters``
    fail if any trainable parameter is left out of the loss graph."""
    model = build(name, **kw).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, target = batch()
    for _ in range(2):
        losses = ddp(images, target)
        assert set(losses) >= {"loss"}
        losses["loss"].backward()
    plain = model(images, target)
    assert plain.keys() == losses.keys()


def test_clip_decoder_compat_numerics_needs_rounded_weights(tmp_path):
    from tag2mask.clip.loading import load_clip, save_clip

    clip = tiny_clip()
    with pytest.raises(ValueError, match="round_fp16_weights=True"):
        build("clip-decoder", clip_model=clip, compat_numerics=True)
    save_clip(clip, tmp_path / "clip.safetensors")
    model = build("clip-decoder", clip_weights=str(tmp_path / "clip.safetensors"), clip_model=None, compat_numerics=True)
    assert model.config.clip_fingerprint.endswith(":fp16r")
    rounded = load_clip(tmp_path / "clip.safetensors", round_fp16_weights=True)
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        feats = model.eval().clip_features(images)
        rounded.visual.round_pos_embed_fp16 = True
        ref = rounded.visual.forward_intermediates(images, 2)
    assert torch.equal(feats[-1], ref.tokens[-1][:, 1:].transpose(1, 2).reshape(1, 32, 3, 3))
    assert model.backbone.round_pos_embed_fp16 is False  # restored after the call
