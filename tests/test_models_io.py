"""Saving / loading trained segmenters, pretrained ``transformers`` folders and the download policy."""

from __future__ import annotations

import json

import pytest
import torch

from tag2mask.clip.loading import WeightsError, WeightsNotFoundError, save_clip
from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.models import SEGMENTERS, build_segmenter, load_segmenter, read_segmenter_header, save_segmenter


def _clip_file(tmp_path, seed: int):
    torch.manual_seed(seed)
    clip = CLIP(CLIPConfig(embed_dim=16, vision=VisionConfig(width=32, layers=3, heads=2, image_size=32, patch_size=16),
                           text=TextConfig(width=16, layers=1, heads=1)))
    path = tmp_path / f"clip{seed}.safetensors"
    save_clip(clip, path)
    return path


def _build(name, tmp_path, **kw):
    torch.manual_seed(0)
    if name == "clip-decoder":
        kw.setdefault("clip_weights", str(_clip_file(tmp_path, 1)))
    model = build_segmenter(name, 5, tiny=True, **kw)
    # one training forward so BatchNorm statistics leave their defaults
    model.train()(torch.randn(2, 3, 64, 64))
    return model.eval()


CASES = [(n, {}) for n in sorted(SEGMENTERS)] + [
    ("segformer", {"text_embeddings": torch.randn(4, 12), "text_head": {"similarity": "cosine", "learned_background": True}}),
    ("deeplab-v2", {"aspp": "bn", "text_embeddings": torch.randn(5, 12)}),
    ("clip-decoder", {"text_embeddings": torch.randn(5, 16)}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}{'-text' if k else ''}" for n, k in CASES])
def test_save_load_round_trip_gives_identical_logits(name, kw, tmp_path):
    model = _build(name, tmp_path, **kw)
    images = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        before = model(images)
    path = save_segmenter(model, tmp_path / "model.safetensors", metadata={"classes": json.dumps(list("abcde"))})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    loaded = load_segmenter(path)
    assert not loaded.training and type(loaded) is type(model)
    with torch.no_grad():
        after = loaded(images)
    assert torch.equal(before, after)
    header, meta = read_segmenter_header(path)
    assert header["name"] == name and header["num_classes"] == 5 and json.loads(meta["classes"]) == list("abcde")
    assert header["normalization"] == model.normalization.to_dict()


def test_clip_decoder_file_excludes_the_frozen_clip_and_checks_its_fingerprint(tmp_path):
    from safetensors import safe_open

    model = _build("clip-decoder", tmp_path)
    path = save_segmenter(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("backbone.") for k in keys)
    header, _ = read_segmenter_header(path)
    assert header["config"]["clip_fingerprint"] == model.config.clip_fingerprint != "random-init"
    other = _clip_file(tmp_path, 2)
    with pytest.raises(ValueError, match="not the ones this model was trained on"):
        load_segmenter(path, clip_weights=str(other))
    with pytest.raises(ValueError, match="no CLIP backbone"):
        load_segmenter(save_segmenter(_build("segformer", tmp_path), tmp_path / "s.safetensors"), clip_weights=str(other))


def test_bad_segmenter_files_are_named(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        load_segmenter(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(WeightsError, match="not a tag2mask segmenter"):
        load_segmenter(plain)
    with pytest.raises(WeightsNotFoundError):
        load_segmenter(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        save_segmenter(_build("deeplab-v2", tmp_path), tmp_path / "m.pt")


# ------------------------------------------------------------------------------------------------
# pretrained transformers folders


def _tiny_hf_segformer(num_labels: int):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(3)
    cfg = SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], decoder_hidden_size=16,
                          num_attention_heads=[1, 1, 1, 1], num_labels=num_labels)
    return SegformerForSemanticSegmentation(cfg)


def test_segformer_from_a_save_pretrained_folder(tmp_path):
    hf = _tiny_hf_segformer(num_labels=7)
    hf.save_pretrained(tmp_path / "seg")
    model = build_segmenter("segformer", 5, pretrained=str(tmp_path / "seg"))
    theirs = hf.state_dict()
    ours = model.hf.state_dict()
    encoder = [k for k in theirs if k.startswith("segformer.")]
    assert encoder and all(torch.equal(theirs[k], ours[k]) for k in encoder)
    assert model.classifier.weight.shape[0] == 5  # re-initialised for the new class count
    # same class count: the classifier is kept too
    same = build_segmenter("segformer", 7, pretrained=str(tmp_path / "seg"))
    assert torch.equal(same.classifier.weight, theirs["decode_head.classifier.weight"])
    # and the saved model rebuilds from its stored transformers config, without the folder
    path = save_segmenter(same.eval(), tmp_path / "m.safetensors")
    (tmp_path / "seg" / "config.json").unlink()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # same tensors (checked exactly); the outputs may differ in the last bits because
        # from_pretrained leaves differently laid-out weight storage
        assert all(torch.equal(a, b) for a, b in zip(load_segmenter(path).state_dict().values(), same.state_dict().values()))
        assert torch.allclose(load_segmenter(path)(x), same(x), atol=1e-6)


def test_upernet_and_mask2former_take_a_pretrained_backbone_folder(tmp_path):
    from transformers import ConvNextBackbone, ConvNextConfig, SwinBackbone, SwinConfig

    torch.manual_seed(4)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    convnext = ConvNextBackbone(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 40], out_features=stages))
    convnext.save_pretrained(tmp_path / "convnext")
    model = build_segmenter("upernet", 3, tiny=True, backbone_pretrained=str(tmp_path / "convnext"))
    assert all(torch.equal(v, model.hf.backbone.state_dict()[k]) for k, v in convnext.state_dict().items())
    assert model.hf.backbone.channels[-1] == 40  # the folder's config, not the 'tiny-convnext' variant
    swin = SwinBackbone(SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 2],
                                   window_size=4, out_features=stages))
    swin.save_pretrained(tmp_path / "swin")
    m2f = build_segmenter("mask2former", 3, tiny=True, backbone_pretrained=str(tmp_path / "swin"))
    encoder = m2f.hf.model.pixel_level_module.encoder.state_dict()
    assert all(torch.equal(v, encoder[k]) for k, v in swin.state_dict().items())


def test_missing_or_wrong_local_folders_are_clear_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such folder"):
        build_segmenter("segformer", 3, pretrained=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        build_segmenter("segformer", 3, pretrained=str(tmp_path / "empty"))


def test_hub_ids_need_permission_and_fail_clearly_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("TAG2MASK_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(WeightsNotFoundError, match="--allow-download"):
        build_segmenter("segformer", 3, pretrained="nvidia/mit-b0")
    # allowed, but the machine is offline: a clear error instead of a transformers traceback
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError, match="offline"):
        build_segmenter("segformer", 3, pretrained="nvidia/mit-b0", allow_download=True)
    monkeypatch.setenv("TAG2MASK_ALLOW_DOWNLOAD", "1")
    with pytest.raises(WeightsNotFoundError, match="could not download"):
        build_segmenter("upernet", 3, backbone_pretrained="facebook/convnext-tiny-224")
