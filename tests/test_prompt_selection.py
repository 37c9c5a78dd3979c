"""CLIP-ES sharpness-based prompt selection: the score against a direct computation, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.methods.clip_es.prompt_selection import clip_preprocess, rank_templates, sharpness

TEMPLATES = ("a photo of a {}.", "a clean origami {}.", "art of the {}.")


def test_sharpness_is_mean_variance_to_mean_ratio_over_multilabel_images():
    scores = [[0.5, 0.1, 0.3], [0.9], [0.2, 0.2], []]
    value, n = sharpness(scores)
    expected = np.mean([np.var([0.5, 0.1, 0.3]) / 0.3, 0.0])  # single-label and empty images skipped
    assert n == 2 and value == pytest.approx(expected, rel=1e-12)
    assert np.isnan(sharpness([[0.4], [0.7]])[0])


@pytest.fixture(scope="module")
def scenes():
    from tag2mask.synth import SyntheticDataset

    data = SyntheticDataset("val", 12, 96)
    picked = [s for s in data if len(s.labels) >= 2][:4] + [s for s in data if len(s.labels) == 1][:1]
    assert sum(len(s.labels) >= 2 for s in picked) >= 2
    return [Image.fromarray(s.image) for s in picked], [[c - 1 for c in s.labels] for s in picked]


def test_rank_templates_matches_a_direct_computation(scenes):
    """Standard CLIP probabilities computed here by hand (CLS embedding, softmax over all classes)."""
    from tag2mask.clip import load_clip, tiny_clip_path
    from tag2mask.clip.tokenizer import tokenize
    from tag2mask.vocab.vocabulary import get_vocabulary

    images, labels = scenes
    model = load_clip(tiny_clip_path())
    vocab = get_vocabulary("synth")
    ranking = rank_templates(model, images, labels, vocab, TEMPLATES)
    assert [r.sharpness for r in ranking] == sorted(r.sharpness for r in ranking)
    by_template = {r.template: r for r in ranking}
    assert set(by_template) == set(TEMPLATES)
    size = model.visual.image_size
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.cat([clip_preprocess(im, size) for im in images])), dim=-1)
        for template in TEMPLATES:
            txt = F.normalize(model.encode_text(tokenize([template.format(n) for n in vocab.names])), dim=-1)
            probs = (model.logit_scale.exp() * img @ txt.t()).softmax(-1).double().numpy()
            ratios = [np.var(probs[i, ids]) / np.mean(probs[i, ids]) for i, ids in enumerate(labels) if len(ids) > 1]
            got = by_template[template]
            assert got.images == len(ratios)
            assert got.sharpness == pytest.approx(float(np.mean(ratios)), rel=1e-5)
            assert got.mean_label_prob == pytest.approx(float(np.mean(np.concatenate(
                [probs[i, ids] for i, ids in enumerate(labels)]))), rel=1e-5)
    assert len({round(r.sharpness, 9) for r in ranking}) == len(TEMPLATES)  # the templates are told apart


def test_rank_templates_encodes_each_image_once(scenes, monkeypatch):
    """Image features do not depend on the template: N images are encoded N times in all, not N x templates."""
    from tag2mask.clip import load_clip, tiny_clip_path
    from tag2mask.vocab.vocabulary import get_vocabulary

    images, labels = scenes
    model = load_clip(tiny_clip_path())
    encoded: list[int] = []
    original = model.encode_image

    def counting(x, *a, **k):
        encoded.append(int(x.shape[0]))
        return original(x, *a, **k)

    monkeypatch.setattr(model, "encode_image", counting)
    ranking = rank_templates(model, images, labels, get_vocabulary("synth"), TEMPLATES, batch_size=2)
    assert len(ranking) == len(TEMPLATES) > 1
    assert sum(encoded) == len(images)


def test_clip_preprocess_centre_crops_the_short_side():
    im = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3) % 251)
    x = clip_preprocess(im, 32)
    assert x.shape == (1, 3, 32, 32)


def test_prompts_select_command(tmp_path: Path, scenes):
    from tag2mask.cli.main import main

    images, labels = scenes
    names = {}
    from tag2mask.vocab.vocabulary import get_vocabulary

    vocab = get_vocabulary("synth")
    for i, (im, ids) in enumerate(zip(images, labels)):
        im.save(tmp_path / f"s{i}.png")
        names[f"s{i}.png"] = [vocab.names[k] for k in ids]
    (tmp_path / "tags.json").write_text(json.dumps(names))
    (tmp_path / "templates.txt").write_text("# candidates\n" + "\n".join(TEMPLATES) + "\n")
    out = tmp_path / "ranking.json"
    rc = main(["prompts", "select", "--images", str(tmp_path), "--labels", str(tmp_path / "tags.json"),
               "--classes", "synth", "--templates", str(tmp_path / "templates.txt"), "--out", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0
    record = json.loads(out.read_text())
    assert [r["template"] for r in record["ranking"]] and len(record["ranking"]) == len(TEMPLATES)
    assert record["multi_label_images"] == sum(len(ids) > 1 for ids in labels)
    values = [r["sharpness"] for r in record["ranking"]]
    assert values == sorted(values)
    (tmp_path / "bad.txt").write_text("no slot here\n")
    assert main(["prompts", "select", "--images", str(tmp_path), "--labels", str(tmp_path / "tags.json"),
                 "--classes", "synth", "--templates", str(tmp_path / "bad.txt"), "--device", "cpu", "--quiet"]) == 2
