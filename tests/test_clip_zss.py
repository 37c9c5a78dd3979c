"""CLIP-ZSS building blocks (no reference implementation exists: internal consistency, spec §5 items 16-18).

GLM loss = a cross-entropy over the stated logits (bank included); K-means is a function of the tokens
(no random draw); mask fusion uses every seed once; pseudo regions never overwrite labelled pixels;
the NEL loss against a per-channel float64 reference; gradients reach only the student and the
synthesizer; the teacher's tokens equal the shared MaskCLIP path; the named splits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tag2mask.methods.clip_zss.config import ASSUMED, FROM_ZEGCLIP_CODE, ClipZssConfig
from tag2mask.methods.clip_zss.glm import ClsBank, attention_pool, glm_loss
from tag2mask.methods.clip_zss.losses import nel_loss
from tag2mask.methods.clip_zss.method import ClassLayout, ClipZss, UnseenNameError, check_no_unseen
from tag2mask.methods.clip_zss.regions import (
    IGNORE, fuse_labels, fuse_seeds, multiscale_kmeans, pseudo_regions, spherical_kmeans, window_seeds,
)
from tag2mask.vocab.zero_shot_splits import COCO_STUFF_171, PASCAL_CONTEXT_59, SPLITS, get_split
from tag2mask.methods.clip_zss.synthesizer import region_centroids


# --- GLM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bank_rows", [0, 5])
def test_glm_loss_is_cross_entropy_over_the_stated_logits(bank_rows):
    g = torch.Generator().manual_seed(0)
    b, d, h, w, tau = 3, 8, 4, 5, 0.5
    cls = torch.randn(b, d, generator=g, dtype=torch.float64)
    dense = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    bank = torch.randn(bank_rows, d, generator=g, dtype=torch.float64)
    # the paper's formulas, written out per image
    expected = 0.0
    for i in range(b):
        r = dense[i].reshape(d, -1)                                   # (D, L)
        weights = torch.softmax(cls[i] @ r / math.sqrt(d), dim=0)      # W = softmax_L(S·R/√C)
        pooled = r @ weights                                           # Ŝ = W·Rᵀ
        keys = torch.cat([cls, bank])
        cos = torch.stack([F.cosine_similarity(k, pooled, dim=0) for k in keys]) / tau
        expected += -(cos[i] - torch.logsumexp(cos, dim=0))            # -log(e^{s_i ŝ_i} / Σ_j ...)
    expected /= b
    got = glm_loss(cls.float(), dense.float(), bank.float(), tau)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # the bank's negatives change the loss; an empty bank is no bank
    if bank_rows:
        assert glm_loss(cls.float(), dense.float(), None, tau).item() < got.item()
    pooled, weights = attention_pool(cls.float(), dense.float())
    assert weights.shape == (b, h * w) and torch.allclose(weights.sum(-1), torch.ones(b))


def test_glm_gradient_reaches_only_the_dense_features():
    cls = torch.randn(2, 6, requires_grad=True)
    dense = torch.randn(2, 6, 3, 3, requires_grad=True)
    glm_loss(cls, dense, torch.randn(4, 6)).backward()
    assert cls.grad is None and dense.grad is not None and dense.grad.abs().sum() > 0


def test_cls_bank_is_first_in_first_out_and_round_trips():
    bank = ClsBank(size=4, dim=3)
    for k in range(3):
        bank.push(torch.full((2, 3), float(k + 1)))
    items = bank.tensor()
    assert items.shape == (4, 3)
    assert torch.allclose(items, F.normalize(torch.tensor([[2.0] * 3] * 2 + [[3.0] * 3] * 2), dim=-1))
    other = ClsBank(size=4, dim=3)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.tensor(), items)
    with pytest.raises(ValueError, match="does not fit"):
        ClsBank(4, 5).load_state_dict(bank.state_dict())
    none = ClsBank(size=0, dim=3)
    none.push(torch.ones(2, 3))
    assert none.tensor().shape == (0, 3)


# --- PLM: K-means, fusion, fused labels -----------------------------------------------------------


def _blocky_tokens(seed: int = 0, d: int = 6, h: int = 8, w: int = 8) -> torch.Tensor:
    """Tokens with three clean regions plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(3, d, generator=g), dim=-1)
    region = torch.zeros(h, w, dtype=torch.long)
    region[:, w // 2:] = 1
    region[h // 2:, : w // 3] = 2
    tokens = protos[region].permute(2, 0, 1) + 0.05 * torch.randn(d, h, w, generator=g)
    return tokens


def test_window_seeds_are_window_means():
    tokens = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)
    seeds = window_seeds(tokens, 2)
    # windows start every 2 tokens; the last window along h (5) is shifted to rows 3..4
    assert seeds.shape == (3 * 3, 2)
    expected_last = F.normalize(tokens[:, 3:5, 4:6].mean(dim=(1, 2)), dim=0)
    assert torch.allclose(seeds[-1], expected_last)
    assert torch.allclose(seeds[0], F.normalize(tokens[:, 0:2, 0:2].mean(dim=(1, 2)), dim=0))


def test_kmeans_is_a_function_of_the_tokens_alone():
    tokens = _blocky_tokens()
    torch.manual_seed(1)
    a = multiscale_kmeans(tokens, (0.25, 0.5), 10)
    ra = pseudo_regions(tokens[None], (32, 32), (0.25, 0.5), 10, 0.8)
    torch.manual_seed(12345)
    _ = torch.rand(100)  # a different global RNG state must not matter
    b = multiscale_kmeans(tokens, (0.25, 0.5), 10)
    rb = pseudo_regions(tokens[None], (32, 32), (0.25, 0.5), 10, 0.8)
    assert len(a) == len(b) == 2
    for (ca, ma), (cb, mb) in zip(a, b):
        assert torch.equal(ca, cb) and torch.equal(ma, mb)
        assert ma.sum(0).eq(1).all()  # every token in exactly one cluster
    assert torch.equal(ra, rb)
    # the three planted regions come out as three fused regions
    assert ra[0].unique().numel() == 3


def test_spherical_kmeans_converges_to_cluster_means():
    g = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(2, 4, generator=g), dim=-1)
    pts = F.normalize(centres.repeat_interleave(10, 0) + 0.01 * torch.randn(20, 4, generator=g), dim=-1)
    cent, assign = spherical_kmeans(pts, pts[[0, 19]], iters=5)
    assert torch.equal(assign, torch.tensor([0] * 10 + [1] * 10))
    assert torch.allclose(cent[0], F.normalize(pts[:10].sum(0), dim=0), atol=1e-6)


def test_fusion_uses_every_seed_exactly_once():
    g = torch.Generator().manual_seed(4)
    base = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    seeds = [base + 0.01 * torch.randn(3, 5, generator=g), base[[2, 0]] + 0.01 * torch.randn(2, 5, generator=g),
             F.normalize(torch.randn(2, 5, generator=g), dim=-1)]
    fused, groups = fuse_seeds(seeds, threshold=0.95)
    flat = sorted(i for grp in groups for i in grp)
    assert flat == list(range(7))                  # a partition of the seeds: none reused, none lost
    assert [0, 4] in groups and [2, 3] in groups   # near-duplicates across scales were merged
    assert fused.shape == (len(groups), 5) and torch.allclose(fused.norm(dim=-1), torch.ones(len(groups)))
    _, alone = fuse_seeds(seeds, threshold=1.0)    # nothing is above cosine 1: every seed on its own
    assert alone == [[i] for i in range(7)]


def test_pseudo_regions_never_overwrite_labelled_pixels():
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, 4, (3, 20, 24), generator=g)
    target[:, 5:15, 6:18] = IGNORE
    target[1] = IGNORE
    target[2] = 2  # nothing ignored
    regions = torch.randint(0, 6, (3, 20, 24), generator=g)
    regions[:, :10] = 7  # one big region
    fused, counts = fuse_labels(target, regions, num_seen=4, max_regions=3, min_pixels=5)
    labelled = target != IGNORE
    assert torch.equal(fused[labelled], target[labelled])
    new = fused != target
    assert not (new & labelled).any()
    assert set(fused[new].unique().tolist()) <= {4, 5, 6}
    assert counts.tolist()[2] == 0 and 0 < counts[0] <= 3 and counts[1] == 3
    # the largest region inside the ignored area comes first
    assert int((fused[1] == 4).sum()) == int((regions[1] == 7).sum())
    # regions below min_pixels stay ignored
    fused_big, counts_big = fuse_labels(target, regions, num_seen=4, max_regions=8, min_pixels=10_000)
    assert torch.equal(fused_big, target) and counts_big.sum() == 0


def test_region_centroids_are_pixel_averages_of_nearest_upsampled_features():
    g = torch.Generator().manual_seed(6)
    dense = torch.randn(2, 3, 4, 5, generator=g)
    labels = torch.randint(0, 3, (2, 8, 10), generator=g)
    labels[0, :, :4] = IGNORE
    cent, present = region_centroids(dense, labels, num_ids=4)
    up = F.interpolate(dense, size=(8, 10), mode="nearest")
    for b in range(2):
        for k in range(4):
            mask = labels[b] == k
            assert bool(present[b, k]) == bool(mask.any())
            if mask.any():
                assert torch.allclose(cent[b, k], up[b][:, mask].mean(-1), atol=1e-6)


# --- NEL ------------------------------------------------------------------------------------------


def _nel_reference(logits, labels, valid, alpha=0.25, gamma=2.0):
    x = F.interpolate(logits.double(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    b, c = x.shape[:2]
    focal_sum, dice_sum, pairs = 0.0, 0.0, 0
    for i in range(b):
        for k in range(c):
            if not valid[i, k]:
                continue
            t = (labels[i] == k).double()          # ignored pixels: 0 for every class
            p = torch.sigmoid(x[i, k])
            ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
            pt = p * t + (1 - p) * (1 - t)
            focal_sum += ((alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - pt) ** gamma).mean()
            if t.sum() > 0:
                pairs += 1
                dice_sum += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    n = max(pairs, 1)
    return focal_sum / n, dice_sum / n


def test_nel_loss_matches_a_per_channel_reference():
    g = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(2, 5, 6, 7, generator=g)
    labels = torch.randint(0, 5, (2, 12, 14), generator=g)
    labels[0, :4] = IGNORE
    labels[1][labels[1] == 3] = 4
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    focal, dice = nel_loss(logits, labels, valid)
    ref_focal, ref_dice = _nel_reference(logits, labels, valid)
    assert focal.item() == pytest.approx(float(ref_focal), rel=1e-5)
    assert dice.item() == pytest.approx(float(ref_dice), rel=1e-5)
    # an explicit normaliser replaces the local count (ZegCLIP averages it over the processes)
    f2, d2 = nel_loss(logits, labels, valid, num_masks=2.0)
    present0 = len(set(labels[0].unique().tolist()) - {IGNORE})
    present1 = len(set(labels[1].unique().tolist()) - {IGNORE, 4})
    pairs = present0 + present1
    assert f2.item() == pytest.approx(focal.item() * pairs / 2, rel=1e-5)


# --- the model: gradients, unseen names -------------------------------------------------------------


def _tiny_student(num_texts: int, dim: int = 16, learned_background: bool = True):
    from tag2mask.models import build_segmenter

    text = F.normalize(torch.randn(num_texts, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return build_segmenter("segformer", num_texts + int(learned_background), tiny=True, text_embeddings=text,
                           text_head={"similarity": "cosine", "learned_background": learned_background})


def test_gradients_reach_only_the_student_and_the_synthesizer(tiny_clip_path):
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.clip_zss.teacher import ClipTeacher

    clip = load_clip(tiny_clip_path)
    teacher = ClipTeacher(clip.visual)
    dim = clip.config.embed_dim
    config = ClipZssConfig(glm_bank_size=4, synth_heads=4, max_regions=3)
    student = _tiny_student(4, dim)
    method = ClipZss(student, config, num_seen_outputs=5)
    g = torch.Generator().manual_seed(1)
    images01 = torch.rand(2, 3, 64, 64, generator=g)
    labels = torch.randint(0, 5, (2, 64, 64), generator=g)
    labels[:, 20:50, 10:40] = IGNORE
    t = teacher(images01)
    fused, counts = method.pseudo_labels(labels, t.dense)
    assert counts.sum() > 0
    for p in clip.parameters():  # even if someone unfreezes the CLIP, the teacher path has no graph
        p.requires_grad_(True)
    losses = method(student.normalization(images01), fused, counts, t.cls, t.dense, torch.randn(3, dim))
    assert set(losses) >= {"loss", "glm", "bce", "nel_focal", "nel_dice", "ce"}
    losses["loss"].backward()
    trainable = {id(p) for p in method.parameters()}
    for name, p in clip.named_parameters():
        assert p.grad is None, f"the teacher's {name} got a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.synthesizer.parameters())
    assert all(id(p) in trainable for p in method.parameters() if p.grad is not None)
    assert student.text_classifier.text.grad is None  # a buffer: the text embeddings are frozen


def test_unseen_names_cannot_enter_training():
    with pytest.raises(UnseenNameError, match="Heart"):
        check_no_unseen(["star", "Heart"], ["heart"])
    check_no_unseen(["star", "ring"], ["heart"])
    # a student whose head holds more than the seen classes is refused in the step
    student = _tiny_student(6, 16)
    method = ClipZss(student, ClipZssConfig(use_plm=False, use_glm=False), num_seen_outputs=5)
    with pytest.raises(UnseenNameError, match="only the 5 seen outputs"):
        method(torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long), torch.zeros(1),
               torch.zeros(1, 16), torch.zeros(1, 16, 2, 2), None)


def test_teacher_outputs_equal_clip_and_maskclip_paths(tiny_clip_path):
    from tag2mask.clip.loading import load_clip
    from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
    from tag2mask.methods.clip_zss.teacher import ClipTeacher
    from tag2mask.methods.ovss.last_block import maskclip_block

    clip = load_clip(tiny_clip_path)
    images01 = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    out = ClipTeacher(clip.visual)(images01)
    x = (images01 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(out.cls, clip.encode_image(x), atol=1e-5)
    dense, grid = clip.visual.forward_dense(x, last_block=maskclip_block)
    assert out.dense.shape == (2, clip.config.embed_dim, *grid)
    assert torch.allclose(out.dense.flatten(2).transpose(1, 2), dense, atol=1e-5)


# --- splits, layouts, config ------------------------------------------------------------------------


def test_named_splits_are_the_published_lists():
    voc = get_split("voc-15-5")
    assert voc.unseen == ("pottedplant", "sheep", "sofa", "train", "tvmonitor") and len(voc.seen) == 15
    assert voc.unseen_ids == (16, 17, 18, 19, 20) and voc.background == "ignore"
    coco = get_split("coco-stuff-156-15")
    assert len(COCO_STUFF_171) == 171 and len(coco.seen) == 156 and coco.background == "none"
    assert coco.unseen == ("cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard",
                           "clouds", "grass", "playingfield", "river", "road", "tree", "wall-concrete")
    ctx = get_split("context-49-10")
    assert len(PASCAL_CONTEXT_59) == 59 and len(ctx.seen) == 49
    # MaskCLIP+'s Context-60 indices (background = 0)
    assert sorted(ctx.unseen_ids) == sorted([20, 34, 49, 15, 8, 25, 7, 55, 32, 1])
    synth = get_split("synth-9-3")
    assert len(synth.seen) == 9 and len(synth.unseen) == 3
    assert set(SPLITS) == {"voc-15-5", "coco-stuff-156-15", "context-49-10", "synth-9-3"}
    with pytest.raises(ValueError, match="choose from"):
        get_split("voc-10-10")


@pytest.mark.parametrize("background", ["class", "ignore", "none"])
def test_class_layout_maps_labels_to_training_outputs(background):
    names = (("background",) if background != "none" else ()) + ("a", "b", "c", "d")
    layout = ClassLayout(names, ("b", "d"), background)
    lut = layout.train_lookup()
    first = 1 if background != "none" else 0
    a, b, c, d = range(first, first + 4)
    assert lut[b] == lut[d] == IGNORE and lut[255] == IGNORE
    if background == "class":
        assert (lut[0], lut[a], lut[c]) == (0, 1, 2) and layout.num_train_outputs == 3
    else:
        assert (lut[a], lut[c]) == (0, 1) and layout.num_train_outputs == 2
        if background == "ignore":
            assert lut[0] == IGNORE
    assert layout.label_offset == (1 if background == "ignore" else 0)
    assert layout.seen == ("a", "c")
    with pytest.raises(ValueError, match="nothing to train"):
        ClassLayout(names, ("a", "b", "c", "d"), background)


def test_every_open_value_is_a_documented_assumption():
    from pathlib import Path

    fields = set(ClipZssConfig.__dataclass_fields__)
    assert set(ASSUMED) <= fields and set(FROM_ZEGCLIP_CODE) <= fields
    doc = (Path(__file__).resolve().parents[1] / "docs" / "clip_zss.md").read_text()
    for name in ASSUMED:
        line = next((ln for ln in doc.splitlines() if f"`{name}`" in ln), "")
        assert "assumed" in line, f"docs/clip_zss.md does not mark {name} as assumed"
    for name in FROM_ZEGCLIP_CODE:
        assert f"`{name}`" in doc
    # switches and bookkeeping are not assumptions; every other field is one of the two lists
    assert fields == {"split", "unseen", "background", "use_glm", "use_plm"} | set(ASSUMED) | set(FROM_ZEGCLIP_CODE)
