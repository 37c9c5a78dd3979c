"""The text-embedding classifier: logits equal a direct per-pixel computation, over several backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.models import TextEmbeddingClassifier, TextHeadConfig, build_segmenter

D, K = 12, 4


def direct_logits(features, proj_w, proj_b, text, background, similarity, scale):
    """float64 loops: project each pixel, optionally normalise, dot with each (normalised) class embedding."""
    feats = features.detach().double().numpy()
    text = text.detach().double().numpy()
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    rows = [text[k] for k in range(text.shape[0])]
    if background is not None:
        bg = background.detach().double().numpy()[0]
        rows = [bg / np.linalg.norm(bg)] + rows
    b, f, h, w = feats.shape
    out = np.zeros((b, len(rows), h, w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                v = feats[i, :, y, x]
                if proj_w is not None:
                    v = proj_w.detach().double().numpy()[:, :, 0, 0] @ v + proj_b.detach().double().numpy()
                if similarity == "cosine":
                    v = v / np.linalg.norm(v)
                for k, t in enumerate(rows):
                    out[i, k, y, x] = scale * float(v @ t)
    return out


@pytest.mark.parametrize("similarity,background,in_ch", [("dot", False, D), ("dot", True, 7), ("cosine", True, 7), ("cosine", False, D)])
def test_classifier_logits_equal_direct_computation(similarity, background, in_ch):
    torch.manual_seed(0)
    text = torch.randn(K, D)
    cfg = TextHeadConfig(similarity=similarity, learned_background=background)
    head = TextEmbeddingClassifier(in_ch, cfg, text)
    feats = torch.randn(2, in_ch, 3, 4)
    got = head(feats).double().detach().numpy()
    proj = head.proj if isinstance(head.proj, torch.nn.Conv2d) else None
    scale = 1.0 if similarity == "dot" else 1 / 0.07
    want = direct_logits(feats, None if proj is None else proj.weight, None if proj is None else proj.bias,
                         text, head.background, similarity, scale)
    assert got.shape == (2, K + background, 3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (proj is None) == (in_ch == D)  # projection only when the widths differ ('auto')


def test_background_and_scale_are_trainable_and_text_is_frozen():
    head = TextEmbeddingClassifier(D, TextHeadConfig(similarity="cosine", learned_background=True,
                                                     learn_logit_scale=True, logit_scale=10.0), torch.randn(K, D))
    names = {n for n, p in head.named_parameters()}
    assert names == {"background", "log_scale"}  # projection is Identity (widths match), text is a buffer
    assert "text" in dict(head.named_buffers())
    head(torch.randn(1, D, 2, 2)).sum().backward()
    assert head.background.grad is not None and head.log_scale.grad is not None
    assert torch.isclose(head.log_scale.exp(), torch.tensor(10.0))


def test_set_text_embeddings_changes_the_vocabulary():
    torch.manual_seed(0)
    head = TextEmbeddingClassifier(D, TextHeadConfig(learned_background=True), torch.randn(K, D))
    new = torch.randn(K + 3, D) * 5
    head.set_text_embeddings(new)
    assert head.num_outputs == K + 4
    assert torch.allclose(head.text.norm(dim=1), torch.ones(K + 3))
    with pytest.raises(ValueError, match=r"\(K, 12\)"):
        head.set_text_embeddings(torch.randn(3, D + 1))


def _tiny_clip() -> CLIP:
    torch.manual_seed(1)
    return CLIP(CLIPConfig(embed_dim=16, vision=VisionConfig(width=32, layers=3, heads=2, image_size=32, patch_size=16),
                           text=TextConfig(width=16, layers=1, heads=1))).eval()


@pytest.mark.parametrize("name", ["segformer", "clip-decoder", "deeplab-v2", "deeplab-v3plus", "upernet"])
def test_network_logits_are_the_text_head_on_its_features(name):
    torch.manual_seed(0)
    text = torch.randn(K, D)
    extra = {"clip_model": _tiny_clip()} if name == "clip-decoder" else {}
    model = build_segmenter(name, K + 1, tiny=True, text_embeddings=text,
                            text_head={"similarity": "cosine", "learned_background": True}, **extra).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(images)
        logits = model(images)
    head = model.text_classifier
    proj = head.proj if isinstance(head.proj, torch.nn.Conv2d) else None
    want = direct_logits(feats, None if proj is None else proj.weight, None if proj is None else proj.bias,
                         text, head.background, "cosine", 1 / 0.07)
    np.testing.assert_allclose(logits.double().numpy(), want, rtol=1e-4, atol=1e-4)
    emb = model.dense_embeddings(images)
    assert emb.shape[1] == D
    # zero-shot style vocabulary swap: more classes at test time
    model.set_text_embeddings(torch.randn(K + 2, D))
    assert model.num_classes == K + 3 and model(images).shape[1] == K + 3


def test_maskclip_plus_head_is_dot_product_on_aspp_features():
    """MaskCLIP+: ASPPHeadV2 branches output D channels; logits = conv2d(feat, T) with no projection."""
    torch.manual_seed(0)
    text = torch.randn(K, D)
    model = build_segmenter("deeplab-v2", K + 1, tiny=True, aspp="bn", aspp_channels=D, text_embeddings=text,
                            text_head={"similarity": "dot", "learned_background": True}).eval()
    head = model.text_classifier
    assert isinstance(head.proj, torch.nn.Identity)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 32, 32))
        weights = torch.cat([torch.nn.functional.normalize(head.background, dim=-1),
                             torch.nn.functional.normalize(text, dim=-1)])
        want = torch.nn.functional.conv2d(feats, weights[:, :, None, None])
        got = head(feats)
    assert torch.allclose(got, want, atol=1e-5)


def test_class_count_must_match_the_text_head():
    with pytest.raises(ValueError, match="num_classes=4 but the text head gives 5"):
        build_segmenter("segformer", 4, tiny=True, text_embeddings=torch.randn(K, D),
                        text_head={"learned_background": True})
