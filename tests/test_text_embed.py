"""Text-embedding construction, synonym reduction and the on-disk cache (tiny stand-in model)."""

import torch
import torch.nn.functional as F
import pytest

from golden_sets import SETS, TINY_CLIP_PATH, GoldenCase
from tag2mask.clip.text_embed import TextEmbeddings, cache_key, embed_names, embed_vocabulary
from tag2mask.clip.tokenizer import tokenize
from tag2mask.vocab.vocabulary import get_vocabulary, parse_class_string


class StandIn(torch.nn.Module):
    """encode_text = deterministic bag-of-tokens embedding; counts calls and sentences."""

    def __init__(self, dim: int = 16, fingerprint: str = "standin-v1"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(49408, dim, generator=g))
        self.fingerprint = fingerprint
        self.calls = 0
        self.rows = 0

    def encode_text(self, tokens):
        assert tokens.dtype == torch.long and tokens.shape[1] == 77
        self.calls += 1
        self.rows += tokens.shape[0]
        return self.table[tokens].sum(1) * 3.0  # deliberately not normalised


def test_embed_names_matches_reference_recipe(tmp_path):
    m = StandIn()
    names, templates = ["cat", "person with clothes,people,human"], ["a photo of a {}.", "art of the {}."]
    out = embed_names(m, names, templates, cache_dir=False, batch_size=3)
    assert out.shape == (2, 16) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-6)
    for i, n in enumerate(names):
        f = F.normalize(m.encode_text(tokenize([t.format(n) for t in templates])), dim=-1).mean(0)
        assert torch.allclose(out[i], F.normalize(f, dim=0), atol=1e-6)
    assert not out.requires_grad


def test_cache_hit_and_invalidation(tmp_path):
    m = StandIn()
    names = ["cat", "dog"]
    a = embed_names(m, names, ["a photo of a {}."], cache_dir=tmp_path)
    assert m.calls == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    b = embed_names(m, names, ["a photo of a {}."], cache_dir=tmp_path)
    assert m.calls == 1 and torch.equal(a, b)  # served from disk
    embed_names(m, names, ["a drawing of a {}."], cache_dir=tmp_path)
    assert m.calls == 2  # different templates -> new key
    embed_names(m, ["dog", "cat"], ["a photo of a {}."], cache_dir=tmp_path)
    assert m.calls == 3  # order of names matters
    m.fingerprint = "other-weights"
    embed_names(m, names, ["a photo of a {}."], cache_dir=tmp_path)
    assert m.calls == 4
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files
    assert cache_key("x", ["t {}"], ["a"]) != cache_key("x", ["t {}"], ["b"])


def test_cache_disabled_and_env_default(tmp_path, monkeypatch):
    m = StandIn()
    embed_names(m, ["cat"], ["{}"], cache_dir=False)
    embed_names(m, ["cat"], ["{}"], cache_dir=False)
    assert m.calls == 2
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path))
    embed_names(m, ["cat"], ["{}"])
    embed_names(m, ["cat"], ["{}"])
    assert m.calls == 3 and len(list((tmp_path / "text").glob("*.npy"))) == 1


def test_corrupt_cache_file_is_recomputed(tmp_path):
    m = StandIn()
    a = embed_names(m, ["cat"], ["{}"], cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(b"garbage")
    b = embed_names(m, ["cat"], ["{}"], cache_dir=tmp_path)
    assert m.calls == 2 and torch.allclose(a, b)


def test_reduce_max_over_synonyms():
    emb = TextEmbeddings(torch.eye(5), torch.tensor([0, 0, 1, 2, 2]), 3)
    scores = torch.tensor([[0.1, 0.7, 0.3, 0.9, 0.2], [0.5, 0.4, -1.0, -0.3, -0.2]])
    assert torch.allclose(emb.reduce(scores), torch.tensor([[0.7, 0.3, 0.9], [0.5, -1.0, -0.2]]))
    maps = torch.rand(2, 4, 4, 5)  # (..., S) works for per-pixel scores too
    red = emb.reduce(maps)
    assert red.shape == (2, 4, 4, 3)
    assert torch.equal(red[..., 0], maps[..., :2].amax(-1))
    one = TextEmbeddings(torch.eye(2), torch.tensor([0, 1]), 2)
    assert one.is_one_per_class and torch.equal(one.reduce(scores[:, :2]), scores[:, :2])
    with pytest.raises(ValueError, match="every class"):
        TextEmbeddings(torch.eye(2), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="number of prompts"):
        emb.reduce(torch.zeros(3))


def test_embed_vocabulary(tmp_path):
    m = StandIn()
    v = parse_class_string("cat, person|people|human; background: sky, grass")
    fg, bg = embed_vocabulary(m, v, "photo", cache_dir=tmp_path)
    assert fg.features.shape == (4, 16) and fg.class_index.tolist() == [0, 1, 1, 1] and fg.num_classes == 2
    assert bg.features.shape == (2, 16) and bg.num_classes == 2
    direct = embed_names(m, ["people"], ["a photo of a {}."], cache_dir=False)
    assert torch.allclose(fg.features[2], direct[0], atol=1e-6)
    fg2, bg2 = embed_vocabulary(m, parse_class_string("cat, dog"), ["{}"], cache_dir=False)
    assert bg2 is None and fg2.is_one_per_class
    voc_fg, voc_bg = embed_vocabulary(m, get_vocabulary("voc"), ["a clean origami {}."], cache_dir=False)
    assert voc_fg.features.shape == (20, 16) and voc_bg.features.shape == (25, 16)


def test_random_init_models_are_never_cached(tmp_path):
    m = StandIn(fingerprint="random-init")
    embed_names(m, ["cat"], ["{}"], cache_dir=tmp_path)
    embed_names(m, ["cat"], ["{}"], cache_dir=tmp_path)
    assert m.calls == 2 and not list(tmp_path.glob("*.npy"))


@pytest.mark.parametrize("golden", SETS, ids=[g.name for g in SETS])
def test_matches_official_clip_es_text_features(tmp_path, golden):
    """Every golden set's fg/bg text features (first image's arrays; identical in every image's file)."""
    from tag2mask.clip.loading import load_clip
    from tag2mask.methods.clip_es.pipeline import PRESETS

    # The official loader rounds weights to fp16 (see tests/data/clip_es/README.md).
    model = load_clip(TINY_CLIP_PATH, round_fp16_weights=True)
    vocab = get_vocabulary(PRESETS[golden.preset_name()].vocabulary)
    fg, bg = embed_vocabulary(model, vocab, [golden.template], cache_dir=tmp_path)
    gold = GoldenCase(golden, golden.images[0]).arrays
    assert torch.allclose(fg.features, torch.from_numpy(gold["fg_text"]), atol=1e-5, rtol=0)
    assert torch.allclose(bg.features, torch.from_numpy(gold["bg_text"]), atol=1e-5, rtol=0)
    again, _ = embed_vocabulary(model, vocab, [golden.template], cache_dir=tmp_path)
    assert torch.equal(fg.features, again.features)
