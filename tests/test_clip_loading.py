"""``load_clip`` accepts every supported weight format, refuses bad files clearly, and round-trips its own files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tag2mask.clip.loading import WeightsError, WeightsNotFoundError, load_clip, read_state_dict, save_clip
from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.clip.tokenizer import tokenize
from torchscript_archives import scripted_archive

TEXTS = ["a photo of a cat.", "a clean origami bird avian.", "x"]


def _perturb_(module: nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every floating parameter/buffer so that LayerNorms, biases and BN statistics are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or name.endswith("causal_mask"):
                continue
            noise = scale * torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(1.0 + noise.abs())
            else:
                t.add_(noise)


def _assert_same_parameters(model: CLIP, sd: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert set(ours) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ours[k], v.to(ours[k].dtype)), k


def _tiny_vit_config(vision_heads: int = 2, text_heads: int = 1) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(width=128, layers=2, heads=vision_heads, image_size=32, patch_size=16),
        text=TextConfig(width=64, layers=2, heads=text_heads, context_length=77, vocab_size=49408),
    )


# ---------------------------------------------------------------------------------------------------
# (1) Hugging Face CLIPModel: folder and single .safetensors with HF key names


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=64,  # head dim 64 -> OpenAI's heads = width // 64 rule holds
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=1,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            # transformers >= 4.31 pools at the first position equal to eos_token_id (argmax of the ids only
            # for the legacy eos_token_id == 2); our tokenize() ends with EOT 49407 = the largest id, so both agree
            eos_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            hidden_act="quick_gelu",
        ),
        projection_dim=48,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    _perturb_(model, scale=0.05, seed=1)
    return model


def _features(out) -> torch.Tensor:
    """transformers 5.x returns an output object from get_*_features; 4.x returned the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out[1]


def _check_against_hf(ours: CLIP, hf) -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g)
    tokens = tokenize(TEXTS)
    assert int(tokens.max()) == 49407 == hf.config.text_config.eos_token_id
    with torch.no_grad():
        ref_img = _features(hf.get_image_features(pixel_values=images))
        ref_txt = _features(hf.get_text_features(input_ids=tokens))
        img = ours.encode_image(images)
        txt = ours.encode_text(tokens)
    assert img.shape == ref_img.shape == (2, 48)
    assert txt.shape == ref_txt.shape == (len(TEXTS), 48)
    assert (img - ref_img).abs().max() <= 1e-5
    assert (txt - ref_txt).abs().max() <= 1e-5
    assert torch.allclose(ours.logit_scale, hf.logit_scale)


def test_hf_folder_matches_transformers(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_clip(tmp_path / "hf")
    assert model.source_format == "huggingface-folder"
    cfg = model.config
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.patch_size) == (128, 2, 2, 16)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.embed_dim) == (64, 2, 1, 48)
    assert cfg.activation == "quick_gelu"
    _check_against_hf(model, hf_model)


def test_hf_single_safetensors_matches_transformers(hf_model, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "clip_hf_keys.safetensors"
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(path))
    model = load_clip(path)  # no config: architecture inferred, heads = width // 64
    assert model.source_format == "safetensors+hf-layout"
    assert (model.config.vision.heads, model.config.text.heads) == (2, 1)
    _check_against_hf(model, hf_model)


def test_hf_state_dict_pt_with_module_prefix(hf_model, tmp_path):
    path = tmp_path / "ddp_hf.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in hf_model.state_dict().items()}}, path)
    model = load_clip(path)
    assert model.source_format == "state-dict+hf-layout"
    _check_against_hf(model, hf_model)


def test_hf_config_defaults_and_legacy_config_dict():
    from tag2mask.clip.hf import config_from_hf

    # keys left at transformers' defaults may be missing; legacy ``*_config_dict`` entries take precedence
    cfg = config_from_hf(
        {
            "projection_dim": 768,
            "text_config": {"hidden_size": 512, "num_attention_heads": 8},
            "text_config_dict": {"hidden_size": 768, "num_attention_heads": 12, "hidden_act": "gelu"},
            "vision_config_dict": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                   "patch_size": 14, "hidden_act": "gelu"},
        }
    )
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.patch_size) == (1024, 24, 16, 14)
    assert cfg.vision.image_size == 224 and cfg.embed_dim == 768
    assert (cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.text.vocab_size, cfg.text.context_length) == (
        768, 12, 12, 49408, 77)
    assert cfg.activation == "gelu" and cfg.ln_eps == 1e-5
    with pytest.raises(ValueError, match="activation"):
        config_from_hf({"vision_config": {"hidden_act": "gelu"}, "text_config": {"hidden_act": "quick_gelu"}})
    with pytest.raises(ValueError, match="activation"):
        config_from_hf({"vision_config": {"hidden_act": "relu"}, "text_config": {"hidden_act": "relu"}})


# ---------------------------------------------------------------------------------------------------
# (2) OpenAI TorchScript archive, (3) state-dict variants


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, OpenAI's archives are not
def test_openai_torchscript_archive(tiny_clip_path, tmp_path):
    sd = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted_archive(sd), str(path))
    model = load_clip(path)
    assert model.source_format == "openai-torchscript"
    _assert_same_parameters(model, sd)
    ref = load_clip(tiny_clip_path)
    assert model.config == ref.config
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), ref.encode_image(x))


@pytest.mark.parametrize("variant", ["module_prefix", "wrapped", "wrapped_module_prefix", "openai_extras"])
def test_state_dict_variants(tiny_clip_path, tmp_path, variant):
    sd = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    if variant == "module_prefix":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif variant == "wrapped":
        obj = {"state_dict": sd, "epoch": 3}
    elif variant == "wrapped_module_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    else:
        obj = {**sd, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}
    path = tmp_path / f"{variant}.pth"
    torch.save(obj, path)
    model = load_clip(path)
    assert model.source_format == "state-dict"
    _assert_same_parameters(model, sd)


def test_fp16_state_dict_loads_as_fp32(tiny_clip_path, tmp_path):
    sd = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "half.pt")
    model = load_clip(tmp_path / "half.pt")
    assert model.dtype == torch.float32
    _assert_same_parameters(model, {k: v.half().float() for k, v in sd.items()})


# ---------------------------------------------------------------------------------------------------
# (4) save_clip -> load_clip


def test_save_clip_round_trip_keeps_config(tmp_path):
    cfg = _tiny_vit_config(vision_heads=4, text_heads=2)  # not OpenAI's width // 64: must come from the metadata
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    _perturb_(model)
    path = tmp_path / "sub" / "mine.safetensors"
    save_clip(model, path, metadata={"note": "test"})
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_clip(path)
    assert loaded.config == cfg
    assert loaded.visual.blocks[0].attn.heads == 4 and loaded.transformer.resblocks[0].attn.heads == 2
    _assert_same_parameters(loaded, model.state_dict())
    x = torch.randn(2, 3, 48, 32)
    tokens = tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
        assert torch.equal(loaded.visual.forward_dense(x)[0], model.visual.forward_dense(x)[0])
    # inference from the weights alone would get the heads wrong: the metadata is what keeps them
    sd, stored, fmt = read_state_dict(path)
    assert stored == cfg and fmt == "safetensors"


def test_load_clip_dtype_and_fingerprint(tiny_clip_path):
    a = load_clip(tiny_clip_path)
    b = load_clip(tiny_clip_path, round_fp16_weights=True, dtype=torch.bfloat16)
    assert not a.training and a.dtype == torch.float32 and b.dtype == torch.bfloat16
    assert a.fingerprint != b.fingerprint and b.fingerprint.startswith(a.fingerprint)
    assert a.source_path == str(tiny_clip_path)


# ---------------------------------------------------------------------------------------------------
# (5) bad inputs: the right error type and a message naming the file


_EXECUTED: list[str] = []


def _side_effect(marker: str) -> str:  # what a malicious pickle would run
    _EXECUTED.append(marker)
    Path(marker).write_text("executed")
    return marker


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


def _expect(exc_type, path, match_also: tuple[str, ...] = ()) -> str:
    with pytest.raises(exc_type) as info:
        load_clip(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for s in match_also:
        assert s in msg, (s, msg)
    return msg


def test_truncated_checkpoint(tiny_clip_path, tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(tiny_clip_path.read_bytes()[:1000])
    _expect(WeightsError, path)


def test_text_file_named_pt(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n" * 10)
    _expect(WeightsError, path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    _expect(WeightsError, path, ("empty",))


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _expect(WeightsError, path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_pickled_object_is_refused_not_executed(tmp_path, how):
    marker = tmp_path / f"pwned_{how}.txt"
    path = tmp_path / f"evil_{how}.pt"
    payload = {"visual.proj": torch.zeros(2, 2), "extra": _Payload(str(marker))}
    if how == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    _EXECUTED.clear()
    _expect(WeightsError, path)
    assert not marker.exists() and not _EXECUTED, "the pickle payload was executed"


def test_missing_and_unexpected_keys_are_listed(tiny_clip_path, tmp_path):
    sd = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    del sd["visual.ln_post.bias"]
    sd["visual.adapter.weight"] = torch.zeros(3)
    path = tmp_path / "edited.pt"
    torch.save(sd, path)
    _expect(WeightsError, path, ("visual.ln_post.bias", "visual.adapter.weight", "missing", "unexpected"))


def test_shape_mismatch(tiny_clip_path, tmp_path):
    sd = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    sd["visual.ln_pre.weight"] = torch.ones(7)
    path = tmp_path / "shape.pt"
    torch.save(sd, path)
    _expect(WeightsError, path, ("visual.ln_pre.weight",))


def test_non_clip_state_dict(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict(), path)
    _expect(WeightsError, path, ("not a CLIP",))


def test_non_dict_checkpoint(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    _expect(WeightsError, path)


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "ViT-B-16.pt"
    msg = _expect(WeightsNotFoundError, path)
    assert isinstance(WeightsNotFoundError(msg), FileNotFoundError)  # CLI reports it as a user error


def test_hf_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError) as info:
        load_clip(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_registry_name_not_cached_without_download(tmp_path, monkeypatch):
    monkeypatch.delenv("TAG2MASK_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.chdir(tmp_path)  # "ViT-B/16" must not resolve to a local path
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip("ViT-B/16", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "--allow-download" in msg and "ViT-B-16.pt" in msg and str(tmp_path / "cache") in msg
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip("ViT-B/16", allow_download=False, cache_dir=tmp_path / "cache")
    assert "--allow-download" in str(info.value)


def test_registry_name_found_in_cache(tiny_clip_path, tmp_path, monkeypatch):
    monkeypatch.delenv("TAG2MASK_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    # a (wrong-architecture, but valid) file under the registry file name is picked up without a download
    (cache / "ViT-B-16.pt").write_bytes(tiny_clip_path.read_bytes())
    model = load_clip("ViT-B/16", cache_dir=cache)
    assert model.source_path == str(cache / "ViT-B-16.pt")


# ---------------------------------------------------------------------------------------------------
# (6) ModifiedResNet


def _tiny_resnet_config() -> CLIPConfig:
    # heads = 32 * width // 64, as config_from_state_dict infers for ResNets
    return CLIPConfig(
        embed_dim=24,
        vision=VisionConfig(width=16, layers=(1, 1, 1, 1), heads=8, image_size=64),
        text=TextConfig(width=64, layers=1, heads=1, context_length=77, vocab_size=49408),
    )


def test_resnet_state_dict_round_trip_and_dense(tmp_path):
    torch.manual_seed(0)
    model = CLIP(_tiny_resnet_config()).eval()
    _perturb_(model, scale=0.1)
    path = tmp_path / "rn_tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load_clip(path)
    assert not loaded.is_vit
    assert loaded.config == model.config
    _assert_same_parameters(loaded, model.state_dict())

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-6)
        assert loaded.encode_image(x).shape == (2, 24)

        xd = torch.randn(2, 3, 96, 64)  # not the pretrain size: the dense path needs no positional embedding
        dense, (h, w) = loaded.visual.forward_dense(xd)
        assert (h, w) == (3, 2)
        assert dense.shape == (2, h * w, 24)
        feats = loaded.visual.forward_features(xd)
        assert feats.shape == (2, 16 * 32, h, w)
        pool = loaded.visual.attnpool
        tokens = feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
        explicit = F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
        assert torch.allclose(dense, explicit, atol=1e-6)
        dv = pool.dense_values(feats)
        assert dv.shape == (2, 24, h, w)
        assert torch.allclose(dv.flatten(2).transpose(1, 2), explicit, atol=1e-6)
        with pytest.raises(ValueError):
            loaded.visual(xd)  # the attention pool itself needs the pretrain grid


# ---------------------------------------------------------------------------------------------------
# (7) tag2mask info


def test_info_command(tiny_clip_path, capsys):
    from tag2mask.cli.main import main

    assert main(["info", "--weights", str(tiny_clip_path)]) == 0
    out = capsys.readouterr().out
    assert "ViT-16px" in out and "12 blocks" in out and "text width 64" in out
    assert "state-dict" in out and "float32" in out and str(tiny_clip_path) in out


def test_info_command_reports_bad_weights(tmp_path, capsys):
    from tag2mask.cli.main import main

    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    assert main(["info", "--weights", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(bad) in err
