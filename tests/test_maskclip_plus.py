"""MaskCLIP+ (tag2mask.methods.maskclip_plus.recipe) on the segmenter task, with the shipped tiny CLIP as teacher.

What the official MaskClipPlusHead does and these tests pin: the teacher labels only the -1 pixels of
the same crop (argmax of raw cosine over the listed categories, PD/KS before the bilinear resize);
the switch to self-training happens at the configured iteration and survives a resume; ignored
pixels never enter the loss except through mmseg 0.20's denominator (compat switch). The text head's
logits against a direct computation are tested in test_models_text_head.py (not repeated here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _seg_double import make_dataset
from tag2mask.cmdline.options import shipped_weights_path
from tag2mask.clip.loading import load_clip
from tag2mask.data.segmentation import open_segmentation_data, open_unlabeled_images
from tag2mask.methods.maskclip_plus.recipe import SETTING_NAMES, SETTINGS, MaskClipPlus, MaskClipTeacher, maskclip_plus_config
from tag2mask.methods.ovss.maskclip_refine import key_smooth, prompt_denoise
from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter
from tag2mask.models import IMAGENET_NORMALIZATION, TextEmbeddingClassifier
from tag2mask.models.base import CLIP_NORMALIZATION
from tag2mask.engine.loop import RunOptions, train
from tag2mask.runs.layout import read_run_checkpoint
from tag2mask.engine.logs import read_log
from tag2mask.segmenter.task import UNLABELED, SegmentationCrops, SegmenterTask
from tag2mask.vocab.vocabulary import Vocabulary, get_vocabulary

TINY_STUDENT = {"variant": "tiny"}
ONE_TEMPLATE = ["a photo of a {}."]  # the published numerics with one template: quick text embeddings
SYNTH_TEACHER = {"preset": "default", "templates": ["a photo of a {}."]}


@pytest.fixture(scope="module")
def clip():
    return load_clip(shipped_weights_path())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("mcpdata"), n=6, size=(40, 48))


def _ctx():
    return type("Ctx", (), {"device": torch.device("cpu"),
                            "autocast": staticmethod(lambda: torch.autocast("cpu", enabled=False))})()


def _target(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 13, (batch, size, size), generator=g)
    target[:, : size // 2] = UNLABELED  # the teacher's half
    target[:, -3:] = 255  # crop padding
    return target


def _official_assign_label(segmenter, images, target, cats, pd=0.0, ks=0.0):
    """The official assign_label, written from the spec with the segmenter's rows (one prompt per class)."""
    feats, keys = segmenter.dense_features(images, with_keys=ks > 0)
    label_of_row = segmenter.prompt_label  # synth vocabulary: background words -> 0, class k -> k + 1
    rows = [int(r) for r in torch.nonzero(torch.isin(label_of_row, torch.tensor(cats))).flatten()]
    text = segmenter.text[rows].double()
    out = torch.einsum("nchw,lc->nlhw", feats.double(), text).float()
    if pd > 0:
        out = prompt_denoise(out, pd)
    if ks > 0:
        out = key_smooth(out, keys, ks)
    out = F.interpolate(out, size=target.shape[-2:], mode="bilinear", align_corners=False)
    row_cats = label_of_row[rows]
    # max over a category's prompts (background words), then argmax over categories
    per_cat = torch.stack([out[:, (row_cats == c).nonzero().flatten()].amax(1) for c in cats], 1)
    gt = target.clone()
    unlabeled = gt < 0
    gt[unlabeled] = torch.tensor(cats)[per_cat.argmax(1)][unlabeled]
    return gt


@pytest.mark.parametrize("pd,ks", [(0.0, 0.0), (0.5, 1.0)])
def test_teacher_labels_only_the_unlabelled_pixels_as_assign_label(clip, pd, ks):
    seg = OpenVocabSegmenter(clip, get_vocabulary("synth"), "maskclip", preset="published", prob_threshold=0.0,
                             templates=ONE_TEMPLATE, text_cache=False)
    cats = [0, 2, 5, 7]  # background (its 6 words) and three objects
    teacher = MaskClipTeacher(seg, cats, IMAGENET_NORMALIZATION, background=True, prompt_denoising=pd, key_smoothing=ks)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = _target(2, 64)
    got = teacher(images, target, 0)
    want = _official_assign_label(seg, images, target, cats, pd, ks)
    keep = target != UNLABELED
    assert torch.equal(got[keep], target[keep])  # labelled pixels and the padding are untouched
    assert set(got[~keep].unique().tolist()) <= set(cats) and len(got[~keep].unique()) > 1
    assert torch.equal(got, want)
    assert teacher(images, torch.where(keep, target, 3), 0).equal(torch.where(keep, target, 3))  # nothing to do


def test_teacher_input_normalisation_and_confidence(clip):
    seg = OpenVocabSegmenter(clip, get_vocabulary("synth"), "maskclip", preset="published", prob_threshold=0.0,
                             templates=ONE_TEMPLATE, text_cache=False)
    rgb = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    imagenet, clip_norm = IMAGENET_NORMALIZATION(rgb), CLIP_NORMALIZATION(rgb)
    same = MaskClipTeacher(seg, [1, 2], IMAGENET_NORMALIZATION, background=True)
    other = MaskClipTeacher(seg, [1, 2], CLIP_NORMALIZATION, background=True)
    assert same.teacher_input(imagenet) is not None and torch.equal(same.teacher_input(imagenet), imagenet)
    torch.testing.assert_close(other.teacher_input(clip_norm), imagenet, atol=1e-4, rtol=0)
    # pixels whose best score is below the threshold stay unlabelled (ignored later)
    target = torch.full((1, 32, 32), UNLABELED)
    scores = same.category_scores(imagenet, (32, 32)).amax(1)
    cut = float(scores.median())
    strict = MaskClipTeacher(seg, [1, 2], IMAGENET_NORMALIZATION, background=True, confidence=cut)
    out = strict(imagenet, target, 0)
    assert torch.equal(out == UNLABELED, scores < cut) and bool((out != UNLABELED).any())
    # background can only be taught with background words
    no_words = OpenVocabSegmenter(clip, get_vocabulary("synth").with_background(()), "maskclip", preset="published",
                                  prob_threshold=0.0, templates=ONE_TEMPLATE, text_cache=False)
    with pytest.raises(ValueError, match="background words"):
        MaskClipTeacher(no_words, [0, 1], IMAGENET_NORMALIZATION, background=True)


def _config(**overrides):
    base = dict(max_iters=5, batch_size=2, crop_size=48, model_options=TINY_STUDENT, teacher=SYNTH_TEACHER,
                scale_range=(0.75, 1.25), reference_size=None, test_reference_size=None)
    base.update(overrides)
    return maskclip_plus_config("annotation-free", Vocabulary.from_names(["square", "disk"], ["grass", "sky"]), **base)


def test_network_classifies_with_the_teachers_text(clip):
    config = _config()
    mcp = MaskClipPlus(clip, text_cache=False)
    model = mcp.network(config)
    head = model.text_classifier
    assert isinstance(head, TextEmbeddingClassifier) and head.config.similarity == "dot"
    assert head.background is not None and model.num_classes == config.num_classes == 3
    assert model.config.aspp == "bn" and model.config.aspp_channels == head.text.shape[1]  # ASPPHeadV2 -> text dim
    teacher = mcp.teacher(config, _ctx(), model)
    # one prompt per class: the network's class embeddings are the teacher's rows of those classes
    rows = teacher.segmenter.text[teacher.segmenter.prompt_label > 0]
    torch.testing.assert_close(head.text, rows, atol=1e-6, rtol=0)
    assert config.model_options["loss_average_over_ignored"] is True  # mmseg 0.20 compat on in the recipe


#: The official MaskCLIP+ configs as the specification transcribes them (configs/maskclip_plus/
#: {anno_free,zero_shot}; the spec's "Schedules and phases" and "Zero-shot splits"), typed here from that
#: source, not from tag2mask: iterations, the forward that starts self-training (1-based; None = never),
#: crop, lr / weight decay, and the unseen classes by *name* (indices are checked through the names).
OFFICIAL = {
    "voc20": dict(iters=2000, self_from=None, crop=512, lr=0.01, wd=5e-4, unseen=None),
    "context59": dict(iters=4000, self_from=None, crop=480, lr=0.01, wd=5e-4, unseen=None),
    "coco-stuff": dict(iters=8000, self_from=None, crop=512, lr=0.01, wd=5e-4, unseen=None),
    "voc20-zs": dict(iters=20000, self_from=2000, crop=512, lr=0.01, wd=5e-4,
                     unseen=("potted plant", "sheep", "sofa", "train", "tv monitor")),
    "voc21-zs": dict(iters=20000, self_from=2000, crop=512, lr=0.01, wd=5e-4,
                     unseen=("potted plant", "sheep", "sofa", "train", "tv monitor")),
    "coco-stuff-zs": dict(iters=80000, self_from=8000, crop=512, lr=0.01, wd=5e-4, unseen=None),
    "context60-zs": dict(iters=40000, self_from=4000, crop=480, lr=0.004, wd=1e-4, unseen=None),
}


def _names(vocab: Vocabulary, labels, background: bool) -> tuple[str, ...]:
    offset = 1 if background else 0  # label 0 is background in the 21-class layout
    return tuple(vocab.names[i - offset].lower().replace(" ", "") for i in labels)


def test_settings_are_the_official_configs():
    from tag2mask.methods import registry

    _MCP_SETTINGS = registry.get("maskclip+").presets  # the names --help lists, without importing the method

    assert _MCP_SETTINGS == SETTING_NAMES  # every setting is reachable from the command line
    assert set(OFFICIAL) <= set(SETTING_NAMES)
    for name, ref in OFFICIAL.items():
        vocab = None
        if SETTINGS[name].classes is None:
            n = SETTINGS[name].num_classes
            vocab = Vocabulary.from_names([f"c{i}" for i in range(n)])
        cfg = maskclip_plus_config(name, vocab)
        assert (cfg.max_iters, cfg.crop_size, cfg.lr, cfg.weight_decay) == (ref["iters"], ref["crop"], ref["lr"], ref["wd"]), name
        assert (cfg.min_lr, cfg.momentum, cfg.batch_size) == (1e-4, 0.9, 16), name  # 4 GPUs x samples_per_gpu 4
        # the official counter starts at 1: self-training from forward N = 0-based iteration N - 1
        assert cfg.self_train_from == (None if ref["self_from"] is None else ref["self_from"] - 1), name
        if ref["unseen"] is not None:
            official = tuple(n.replace(" ", "") for n in ref["unseen"])  # "potted plant" = VOC's "pottedplant"
            assert _names(get_vocabulary("voc"), cfg.unlabeled_classes, cfg.background) == official, name
    voc20 = maskclip_plus_config("voc20-zs")
    assert voc20.reduce_zero_label and not voc20.background and voc20.num_classes == 20
    task = SegmenterTask(voc20, None, model_factory=lambda c: None)
    assert task.phase(1998) == "teacher" and task.phase(1999) == "self"
    ctx = maskclip_plus_config("context60-zs", Vocabulary.from_names([f"c{i}" for i in range(59)]))
    assert ctx.model == "deeplab-v3plus" and ctx.background and ctx.num_classes == 60


class _Spy:
    """Wraps MaskClipPlus.teacher: records at which iterations the teacher is asked for labels."""

    def __init__(self, mcp: MaskClipPlus) -> None:
        self.mcp, self.iterations = mcp, []

    def __call__(self, config, ctx, model):
        teacher = self.mcp.teacher(config, ctx, model)

        def call(images, target, iteration):
            self.iterations.append(iteration)
            return teacher(images, target, iteration)

        return call


def _train(out: Path, data: Path, mcp: MaskClipPlus, config, spy=None, **options):
    source = open_unlabeled_images(data / "images")
    task = SegmenterTask(config, source, None, model_factory=mcp.network, teacher_factory=spy or mcp.teacher)
    opts = dict(out_dir=str(out), device="cpu", seed=3, ckpt_every=2, log_every=1, progress=False)
    opts.update(options)
    return task, train(task, RunOptions(**opts))


@pytest.mark.parametrize("stop", [2, 4])  # interrupted before and after the switch at iteration 3
def test_switch_to_self_training_at_the_configured_iteration_survives_resume(tmp_path, clip, data, stop):
    mcp = MaskClipPlus(clip, text_cache=False)
    config = _config(self_train_from=3)
    straight = _Spy(mcp)
    _train(tmp_path / "straight", data, mcp, config, straight)
    assert straight.iterations == [0, 1, 2]  # the teacher labels until the switch, never after
    _train(tmp_path / "part", data, mcp, config, _Spy(mcp), stop_at=stop)
    resumed = _Spy(mcp)
    _, summary = _train(tmp_path / "part", data, mcp, config, resumed, resume="auto")
    assert summary["start_iteration"] == stop and resumed.iterations == [i for i in (0, 1, 2) if i >= stop]
    wa = read_run_checkpoint(tmp_path / "straight", task="segmenter")["modules"]["model"]
    wb = read_run_checkpoint(tmp_path / "part", task="segmenter")["modules"]["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = read_log(tmp_path / "part" / "train_log.csv")
    assert [r["self_training"] for r in rows] == [0, 0, 0, 1, 1]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_log(tmp_path / "straight" / "train_log.csv")]


def test_resume_refuses_another_teacher_clip(tmp_path, clip, data):
    mcp = MaskClipPlus(clip, text_cache=False)
    config = _config(max_iters=2, clip_fingerprint=clip.fingerprint)
    _train(tmp_path / "run", data, mcp, config, stop_at=1)
    other = load_clip(shipped_weights_path())
    other.fingerprint = "0123456789abcdef"
    with pytest.raises(ValueError, match="not the teacher this run was started with"):
        _train(tmp_path / "run", data, MaskClipPlus(other, text_cache=False), config, resume="auto")


def test_self_labelling_forward_keeps_batchnorm_statistics(clip):
    config = _config(self_train_from=0)
    mcp = MaskClipPlus(clip, text_cache=False)
    task = SegmenterTask(config, None, model_factory=mcp.network)
    task.ctx, task.model = _ctx(), mcp.network(config).train()
    before = {k: v.clone() for k, v in task.model.state_dict().items() if "running" in k or "num_batches" in k}
    images, target = torch.randn(2, 3, 48, 48), _target(2, 48) % 3
    target[:, :10] = UNLABELED
    out = task._label_unlabeled(images, target, 0, "self")
    after = task.model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    with torch.no_grad():
        logits = F.interpolate(task.model(images), size=(48, 48), mode="bilinear", align_corners=False)
    assert torch.equal(out[:, :10], logits.argmax(1)[:, :10])  # the network's own argmax over the classes


@pytest.mark.parametrize("compat", [True, False])
def test_ignored_pixels_enter_the_loss_only_through_the_mmseg_denominator(clip, compat):
    config = _config(model_options={**TINY_STUDENT, "loss_average_over_ignored": compat})
    model = MaskClipPlus(clip, text_cache=False).network(config).eval()
    images = torch.randn(2, 3, 48, 48)
    target = _target(2, 48) % 3
    target[:, :12] = 255
    loss = model.training_loss(images, target)["loss"]
    # anything under the ignored pixels (a different label there) gives the same loss
    other = torch.where(target == 255, (target + 1) % 3, target)
    with torch.no_grad():
        per_pixel = F.cross_entropy(F.interpolate(model(images), size=(48, 48), mode="bilinear", align_corners=False),
                                    target, ignore_index=255, reduction="none")
    valid = target != 255
    want = per_pixel[valid].sum() / (target.numel() if compat else valid.sum())
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert float(model.training_loss(images, other)["loss"].detach()) != float(loss.detach())  # the labels there would count


def test_reduce_zero_label_and_images_without_masks(data):
    from tag2mask.data.seg_augment import SegAugment

    source = open_segmentation_data(data / "images", None, data / "labels", 3)
    aug = SegAugment(crop=64, scale_range=(1.0, 1.0), hflip=False)  # the 40x48 image at the top left, then padding
    identity = lambda x: x  # noqa: E731
    _, t = SegmentationCrops(source, aug, identity, 0)[0]
    _, r = SegmentationCrops(source, aug, identity, 0, reduce_zero=True)[0]
    assert bool((t == 0).any()) and torch.equal(r, torch.where((t == 0) | (t == 255), torch.full_like(t, 255), t - 1))
    _, u = SegmentationCrops(open_unlabeled_images(data / "images"), aug, identity, 0)[0]
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[:40, :48] = True
    assert bool((u[inside] == UNLABELED).all()) and bool((u[~inside] == 255).all())


def test_command_line_zero_shot_run_records_the_teacher(tmp_path, data, capsys):
    from tag2mask.cli.main import main

    out = tmp_path / "run"
    args = ["train", "segmenter", "--preset", "maskclip+", "--data", str(data / "images"), "--masks",
            str(data / "labels"), "--classes", "square, disk; background: grass, sky", "--unseen", "disk",
            "--self-train-from", "2", "--teacher-preset", "default", "--templates", "a photo of a {}.",
            "--model-option", "variant=tiny", "--iters", "3", "--batch-size", "2", "--crop", "48", "--log-every", "1",
            "--val-data", str(data / "images"), "--val-masks", str(data / "labels" / "masks"),
            "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["eval"]["zero_shot"]["unseen_classes"] == ["disk"]
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["unlabeled_classes"] == [2] and config["self_train_from"] == 2
    assert config["teacher"]["vocabulary"]["background"] == ["grass", "sky"]
    assert [r["self_training"] for r in read_log(out / "train_log.csv")] == [0, 0, 1]
    # the trained network segments new images without CLIP (the text embeddings are in the file)
    from tag2mask.models import load_segmenter

    net = load_segmenter(out / "model.safetensors")
    assert net.num_classes == 3 and net.text_classifier is not None


def test_command_line_options_that_do_not_apply(tmp_path, data, capsys):
    from tag2mask.cli.main import main

    base = ["train", "segmenter", "--data", str(data / "images"), "--masks", str(data / "labels"), "--out",
            str(tmp_path / "run"), "--device", "cpu", "--quiet"]
    assert main(base + ["--preset", "clip-es", "--unseen", "disk"]) == 2
    assert "--unseen applies to --preset maskclip+ only" in capsys.readouterr().err
    assert main(base + ["--backbone-pretrained", "swin/"]) == 2
    assert "upernet and mask2former" in capsys.readouterr().err
    assert main(base + ["--preset", "maskclip+:coco-stuff", "--classes", "a, b"]) == 2
    assert "171 classes" in capsys.readouterr().err
    assert main(base + ["--preset", "maskclip+:voc20-zs", "--unseen", "disk", "--classes", "voc"]) == 2
    assert "fixes its split" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
