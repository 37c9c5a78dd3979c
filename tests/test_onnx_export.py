"""``tag2mask export --onnx`` / ``segment --onnx`` / ``export --hub`` on the runs of ``tests/data/runs_v0``
(listed in its ``index.json``) and on a CLIP-ZSS student trained here for two iterations.

Parity: onnxruntime's probabilities equal torch's (``segment --checkpoint``, recorded in the fixture's
``expected/``) within ``PROB_ATOL`` and give the same mask wherever torch's top-2 margin exceeds
``MARGIN``; the logits of the graph equal the exported module's within ``LOGIT_ATOL`` (checked by the export
itself, read back from the sidecar). Determinism: two exports are byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tag2mask.cli.main import main  # noqa: E402

ROOT = Path(__file__).parent / "data" / "runs_v0"
RUNS = json.loads((ROOT / "index.json").read_text())["runs"]
IDS = [r["run"] for r in RUNS]
#: float32 graph vs torch: differences come from operator order (ORT kernels) and the NumPy resizes
PROB_ATOL, LOGIT_ATOL, MARGIN = 2e-4, 1e-4, 1e-3


def _weights(case: dict) -> list[str]:
    from tag2mask.clip.shipped import SHIPPED_WEIGHTS

    return ["--weights", str(SHIPPED_WEIGHTS)] if case["clip_weights"] == "shipped" else []


def _export(case: dict, out: Path, *extra: str) -> dict:
    rc = main(["export", str(ROOT / case["run"]), "--onnx", str(out), *_weights(case), *extra])
    assert rc == 0, f"export of {case['run']} failed"
    from tag2mask.export.onnx_runtime import read_sidecar

    return read_sidecar(out)


def _assert_parity(probs: np.ndarray, want: np.ndarray) -> None:
    assert probs.shape == want.shape
    np.testing.assert_allclose(probs, want, rtol=0, atol=PROB_ATOL)
    top2 = np.sort(want, axis=0)[-2:]
    sure = (top2[1] - top2[0]) > MARGIN
    assert sure.mean() > 0.5  # the comparison covers most pixels
    np.testing.assert_array_equal(probs.argmax(0)[sure], want.argmax(0)[sure])


def _images(case: dict):
    from tag2mask.data.images import load_image_array

    expected = ROOT / case["expected"]
    for mask in sorted((expected / "masks").glob("*.png")):
        image = next(p for p in (ROOT / case["images"]).iterdir() if p.stem == mask.stem)
        yield mask.stem, load_image_array(image, max_pixels=None), np.load(expected / "logits" / f"{mask.stem}.npz")


@pytest.mark.parametrize("case", RUNS, ids=IDS)
def test_onnxruntime_matches_torch_on_old_runs(case, tmp_path):
    """Each run exported at each image's working size (one --dynamic graph where the network allows it)
    predicts what ``segment --checkpoint`` predicted."""
    from tag2mask.export.onnx_runtime import OnnxSegmenter, work_size

    meta = _export(case, tmp_path / "fixed.onnx")  # the run's default size; gives its resize rule
    assert max(meta["check"]["max_abs_logit_diff_onnxruntime_vs_torch"].values()) < LOGIT_ATOL
    assert meta["classes"] and len(meta["palette"]) == len(meta["classes"])
    dynamic = main(["export", str(ROOT / case["run"]), "--onnx", str(tmp_path / "dyn.onnx"), "--dynamic",
                    *_weights(case)]) == 0
    assert dynamic or not (tmp_path / "dyn.onnx").exists()  # a refused --dynamic export leaves nothing
    for stem, rgb, want in _images(case):
        size = work_size({**meta, "input": {"size": None}}, *rgb.shape[:2])
        path = tmp_path / "dyn.onnx"
        if not dynamic:
            path = tmp_path / f"{size[0]}x{size[1]}.onnx"
            if not path.exists():
                _export(case, path, "--size", str(size[0]), str(size[1]))
        label, probs = OnnxSegmenter(path).predict(rgb)
        assert list(want["class_names"]) == list(OnnxSegmenter(path).class_names)
        _assert_parity(probs, want["logits"])
        assert label.shape == rgb.shape[:2]


@pytest.mark.parametrize("case", RUNS, ids=IDS)
def test_export_is_deterministic(case, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _export(case, a)
    _export(case, b)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a.onnx.json").read_text() == (tmp_path / "b.onnx.json").read_text()


def test_segment_onnx_command_writes_what_segment_checkpoint_wrote(tmp_path):
    """The command end to end for every run whose network exports with --dynamic (at least one)."""
    from tag2mask.io.palette import read_label_png

    done = 0
    for case in RUNS:
        model = tmp_path / f"{case['run']}.onnx"
        if main(["export", str(ROOT / case["run"]), "--onnx", str(model), "--dynamic", *_weights(case)]) != 0:
            continue
        out = tmp_path / f"seg_{case['run']}"
        assert main(["segment", str(ROOT / case["images"]), "--onnx", str(model), "--out", str(out), "--quiet",
                     "--save-logits"]) == 0
        record = json.loads((out / "run.json").read_text())
        assert record["method"].startswith("onnx:") and record["class_names"] == _export_classes(model)
        for stem, rgb, want in _images(case):
            got = np.load(out / "logits" / f"{stem}.npz")
            _assert_parity(got["logits"], want["logits"])
            assert read_label_png(out / "masks" / f"{stem}.png").shape == rgb.shape[:2]
        done += 1
    assert done >= 1


def _export_classes(model: Path) -> list[str]:
    return json.loads((model.parent / (model.name + ".json")).read_text())["classes"]


def test_segment_onnx_refuses_options_it_does_not_use(tmp_path, capsys):
    case = RUNS[0]
    model = tmp_path / "m.onnx"
    _export(case, model)
    for extra in (["--checkpoint", str(ROOT / case["run"])], ["--crf"], ["--classes", "a, b"], ["--device", "cpu"]):
        rc = main(["segment", str(ROOT / case["images"]), "--onnx", str(model), "--out", str(tmp_path / "o"), *extra])
        assert rc == 2
        assert "with --onnx" in capsys.readouterr().err
    (tmp_path / "m.onnx.json").unlink()
    assert main(["segment", str(ROOT / case["images"]), "--onnx", str(model), "--out", str(tmp_path / "o")]) == 2
    assert "sidecar" in capsys.readouterr().err


def test_existing_output_needs_overwrite_and_a_failed_export_keeps_it(tmp_path, capsys):
    case = RUNS[0]
    model = tmp_path / "m.onnx"
    _export(case, model)
    before = model.read_bytes()
    assert main(["export", str(ROOT / case["run"]), "--onnx", str(model), *_weights(case)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(ROOT / case["run"]), "--onnx", str(model), "--opset", "3", "--overwrite",
                 *_weights(case)]) == 2
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temporary left


@pytest.mark.parametrize("case", RUNS, ids=IDS)
def test_hub_folder_segments_like_the_run(case, tmp_path):
    from tag2mask.io.palette import read_label_png

    hub = tmp_path / "hub"
    assert main(["export", str(ROOT / case["run"]), "--hub", str(hub)]) == 0
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (hub / "README.md").read_text()
    config = json.loads((hub / "config.json").read_text())
    assert config["format"] == "tag2mask-hub-v1" and f"`{config['task']}`" in card
    out = tmp_path / "seg"
    args = ["segment", str(ROOT / case["images"]), "--checkpoint", str(hub), "--out", str(out), "--device", "cpu",
            "--quiet", "--save-logits", *_weights(case)]
    assert main(args) == 0
    for stem, _, want in _images(case):
        np.testing.assert_array_equal(read_label_png(out / "masks" / f"{stem}.png"),
                                      read_label_png(ROOT / case["expected"] / "masks" / f"{stem}.png"))
        got = np.load(out / "logits" / f"{stem}.npz")
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6)
    from tag2mask.runs.hub import run_classes
    from tag2mask.runs.layout import read_run_checkpoint

    names = run_classes(read_run_checkpoint(ROOT / case["run"]))
    assert names and all(n in card for n in names)


def test_hub_card_reports_eval_json_metrics(tmp_path):
    """A run folder with an end-of-run ``eval/eval.json``: the card quotes its scores."""
    import shutil

    case = RUNS[0]
    run = tmp_path / "run"
    shutil.copytree(ROOT / case["run"], run)
    report = {"num_images": 3, "data": "somewhere", "scores": {"Mean IoU": 0.4321, "Pixel Acc": 0.9}}
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(report))
    assert main(["export", str(run), "--hub", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "| Mean IoU | 0.4321 |" in card and "3 images" in card


@pytest.fixture(scope="module")
def zss_run(tmp_path_factory) -> tuple[Path, Path]:
    """A CLIP-ZSS student (tiny SegFormer, shipped tiny CLIP) trained for two iterations on a synthetic set."""
    from tag2mask.clip.shipped import tiny_clip_path
    from tag2mask.data.segmentation import open_segmentation_data
    from tag2mask.engine.loop import RunOptions, train
    from tag2mask.methods.clip_zss.config import ClipZssConfig
    from tag2mask.methods.clip_zss.train_task import ClipZssTask
    from tag2mask.methods.registry import segmenter_preset
    from tag2mask.synth.export import export_voc
    from tag2mask.vocab.zero_shot_splits import get_split

    root = tmp_path_factory.mktemp("zss")
    export_voc(root / "data", {"train": 4, "val": 2}, size=64)
    split = get_split("synth-9-3")
    seg = segmenter_preset(None, model="segformer", model_options={"variant": "tiny"}, classes=split.foreground,
                           crop_size=64, batch_size=2, max_iters=2, optimizer="adamw", lr=1e-3, lr_step=1,
                           test_mode="whole", test_flip=True)
    zss = ClipZssConfig(split=split.name, unseen=split.unseen, background="class", glm_bank_size=3, synth_heads=4,
                        max_regions=3)
    source = open_segmentation_data(root / "data", "train", None, seg.num_classes)
    task = ClipZssTask(seg, zss, source, None, clip_weights=str(tiny_clip_path()), evaluate_at_end=False)
    train(task, RunOptions(out_dir=str(root / "run"), device="cpu", seed=3, ckpt_every=2, progress=False))
    return root / "run", root / "data" / "JPEGImages"


@pytest.mark.parametrize("classes", [None, "bolt, star, ring"], ids=["own-classes", "new-classes"])
def test_clip_zss_student_exports_with_its_text_head(zss_run, classes, tmp_path):
    """The graph holds the text head of one class list; onnxruntime predicts what the torch student predicts."""
    from tag2mask.data.images import load_image_array
    from tag2mask.export.onnx_runtime import OnnxSegmenter
    from tag2mask.methods.clip_zss.inference import ZeroShotStudent

    run, images = zss_run
    extra = ["--classes", classes] if classes else []
    assert main(["export", str(run), "--onnx", str(tmp_path / "z.onnx"), "--dynamic", *extra]) == 0
    onnx_seg = OnnxSegmenter(tmp_path / "z.onnx")
    student = ZeroShotStudent.from_run(run, device="cpu", classes=classes)
    assert onnx_seg.class_names == student.class_names
    if classes:
        assert onnx_seg.class_names[-3:] == tuple(c.strip() for c in classes.split(","))
    files = sorted(images.iterdir())[:2]
    assert files
    for f in files:
        rgb = load_image_array(f, max_pixels=None)
        _, want = student.predict(rgb)
        _, got = onnx_seg.predict(rgb)
        _assert_parity(got, want)


def _network_table() -> dict[str, tuple[str, str]]:
    """``docs/export.md``'s table: network -> (fixed size, --dynamic), each ``yes`` or ``no``."""
    rows = {}
    for line in (Path(__file__).parents[1] / "docs" / "export.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[1].split()[0] in ("yes", "no"):
            rows[cells[0].strip("`")] = (cells[1].split()[0], cells[2].split()[0])
    return rows


def test_every_network_exports_as_docs_export_md_says(tmp_path):
    """Each :mod:`tag2mask.models` network, built tiny: exported at a fixed size and with --dynamic, the
    outcome is the one docs/export.md states; a refusal is a ValueError naming the network."""
    import torch

    from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
    from tag2mask.export.onnx_graph import ExportSpec, TtaLogits, export_onnx
    from tag2mask.models import SEGMENTERS, build_segmenter

    table = _network_table()
    assert set(table) == set(SEGMENTERS)
    for name in sorted(SEGMENTERS):
        torch.manual_seed(0)
        kw = {}
        if name == "clip-decoder":  # the one network that needs a CLIP: a tiny random one
            vision = VisionConfig(width=32, layers=2, heads=2, image_size=32, patch_size=16)
            kw["clip_model"] = CLIP(CLIPConfig(embed_dim=16, vision=vision, text=TextConfig(width=16, layers=1,
                                                                                           heads=1))).eval()
        model = build_segmenter(name, 3, tiny=True, **kw).eval()
        spec = ExportSpec(module=TtaLogits(model, (1.0,), True), kind="segmenter", class_names=("a", "b", "c"),
                          has_background=False, mean=(0.5,) * 3, std=(0.25,) * 3, size=(192, 192),
                          source={"network": name})
        for column, dynamic in ((0, False), (1, True)):
            try:
                meta = export_onnx(spec, tmp_path / f"{name}_{dynamic}.onnx", dynamic=dynamic)
                diffs = meta["check"]["max_abs_logit_diff_onnxruntime_vs_torch"]
                assert len(diffs) == (2 if dynamic else 1) and max(diffs.values()) < LOGIT_ATOL
                outcome = "yes"
            except ValueError as exc:
                assert name in str(exc)
                outcome = "no"
            assert outcome == table[name][column], f"{name} (dynamic={dynamic}): {outcome}, docs/export.md says otherwise"


def test_hf_names_read_the_local_cache_and_say_what_is_missing(tmp_path, monkeypatch, capsys):
    """``hf://USER/REPO[@REV]`` resolves to a hub-style folder in the local Hugging Face cache (no download);
    a repository missing from the cache is one line naming it and the command that fetches it."""
    pytest.importorskip("huggingface_hub")
    case = RUNS[0]
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-run"
    assert main(["export", str(ROOT / case["run"]), "--hub", str(repo / "snapshots" / commit)]) == 0
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "seg"
    args = ["segment", str(ROOT / case["images"]), "--checkpoint", "hf://someone/tiny-run", "--out", str(out),
            "--quiet", "--device", "cpu", *_weights(case)]
    assert main(args) == 0
    assert sorted(p.stem for p in (out / "masks").iterdir()) == sorted(s for s, _, _ in _images(case))
    capsys.readouterr()
    assert main(["export", "hf://someone/other-run@v1", "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "hf://someone/other-run@v1" in err and "hf download someone/other-run --revision v1" in err


def _ort_vs_torch(path: Path, module, sizes) -> dict[tuple[int, int], float]:
    """Largest ``|onnxruntime - torch|`` logit difference at each ``(H, W)`` on a standard-normal input."""
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = {}
    for h, w in sizes:
        x = np.random.default_rng(h * 1000 + w).standard_normal((1, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        got = session.run(["logits"], {"image": x})[0]
        assert got.shape == want.shape == (1, want.shape[1], h, w)
        diffs[(h, w)] = float(np.abs(got - want).max())
    return diffs


def _other_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """The traced size, one 16 / 32 larger, and a non-square one that is no multiple of the patch size."""
    return [(h, w), (h + 16, w + 32), (h + 37, w - 21)]


@pytest.mark.parametrize("case", RUNS, ids=IDS)
def test_dynamic_graph_matches_torch_at_other_sizes(case, tmp_path):
    """Every run exports with --dynamic (WeCLIP too: its CLIP tower resizes the position embeddings from the
    symbolic patch grid) and onnxruntime gives the exported module's logits at sizes other than the traced one."""
    from tag2mask.jobs.checkpoint import resolve_checkpoint
    from tag2mask.methods.registry import run_exporter
    from tag2mask.runs.layout import read_run_checkpoint

    meta = _export(case, tmp_path / "dyn.onnx", "--dynamic")
    assert meta["input"]["size"] is None and len(meta["check"]["max_abs_logit_diff_onnxruntime_vs_torch"]) == 2
    _export(case, tmp_path / "again.onnx", "--dynamic")
    assert (tmp_path / "dyn.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()  # deterministic too
    ckpt = resolve_checkpoint(str(ROOT / case["run"]))
    weights = _weights(case)[1] if _weights(case) else None
    spec = run_exporter(read_run_checkpoint(ckpt)["task"])(ckpt, weights=weights)
    diffs = _ort_vs_torch(tmp_path / "dyn.onnx", spec.module, _other_sizes(*meta["input"]["example_size"]))
    assert max(diffs.values()) < LOGIT_ATOL, diffs


def test_clip_tower_exports_dynamic_when_traced_at_its_pretraining_grid(tmp_path):
    """A CLIP image tower traced at the size of its own position-embedding grid (where eager mode skips the
    resize) still gives a graph that resizes the table at other sizes; eager outputs are unchanged."""
    import torch

    from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
    from tag2mask.export.onnx_graph import ExportSpec, TtaLogits, export_onnx
    from tag2mask.models import build_segmenter

    torch.manual_seed(0)
    vision = VisionConfig(width=32, layers=2, heads=2, image_size=64, patch_size=16)
    clip = CLIP(CLIPConfig(embed_dim=16, vision=vision, text=TextConfig(width=16, layers=1, heads=1))).eval()
    model = build_segmenter("clip-decoder", 3, tiny=True, clip_model=clip).eval()
    spec = ExportSpec(module=TtaLogits(model, (1.0,), False), kind="segmenter", class_names=("a", "b", "c"),
                      has_background=False, mean=(0.5,) * 3, std=(0.25,) * 3, size=(64, 64),
                      source={"network": "clip-decoder"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = spec.module(x)
    export_onnx(spec, tmp_path / "c.onnx", dynamic=True)
    with torch.no_grad():
        assert torch.equal(spec.module(x), before)
    diffs = _ort_vs_torch(tmp_path / "c.onnx", spec.module, _other_sizes(64, 64))
    assert max(diffs.values()) < LOGIT_ATOL, diffs


def test_mask2former_exports_at_a_fixed_size(tmp_path):
    """Mask2Former (tiny, random) runs in onnxruntime at its fixed size: the export casts the deformable
    encoder's reference points to float32 while tracing, so every GridSample node samples a float32 grid;
    the model is restored after (same eager outputs), the bytes are deterministic, --dynamic is refused."""
    import onnx
    import torch

    from tag2mask.export.onnx_graph import ExportSpec, TtaLogits, export_onnx
    from tag2mask.models import build_segmenter

    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_segmenter("mask2former", 3, tiny=True).eval()
    spec = ExportSpec(module=TtaLogits(model, (1.0,), True), kind="segmenter", class_names=("a", "b", "c"),
                      has_background=False, mean=(0.5,) * 3, std=(0.25,) * 3, size=(96, 128),
                      source={"network": "mask2former"})
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        before = spec.module(x)
    export_onnx(spec, tmp_path / "a.onnx")
    export_onnx(spec, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    with torch.no_grad():
        assert torch.equal(spec.module(x), before)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "a.onnx"))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    grids = [n.input[1] for n in graph.node if n.op_type == "GridSample"]
    assert grids and all(types[g] == onnx.TensorProto.FLOAT for g in grids)
    diffs = _ort_vs_torch(tmp_path / "a.onnx", spec.module, [(96, 128)])
    assert max(diffs.values()) < LOGIT_ATOL, diffs
    with pytest.raises(ValueError, match="mask2former.*fixed size only"):
        export_onnx(spec, tmp_path / "d.onnx", dynamic=True)
    assert not (tmp_path / "d.onnx").exists()


def test_a_dynamic_graph_that_froze_a_size_is_refused(tmp_path):
    """A network that reads its input width as a Python number traces that number into the graph as a
    constant: the ``--dynamic`` graph runs at another size but computes something else. The export's
    check refuses it (values, not only shapes) and writes nothing; the fixed-size export is fine."""
    import torch

    from tag2mask.export.onnx_graph import MAX_RELATIVE_DIFF, ExportSpec, export_onnx

    class FrozenWidth(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.conv(x) * (float(x.shape[-1]) / 64.0)  # float(): a constant in the traced graph

    torch.manual_seed(0)
    spec = ExportSpec(module=FrozenWidth().eval(), kind="segmenter", class_names=("a", "b"), has_background=False,
                      mean=(0.5,) * 3, std=(0.25,) * 3, size=(64, 64), source={"network": "frozen-width"})
    meta = export_onnx(spec, tmp_path / "fixed.onnx")
    assert max(meta["check"]["max_abs_logit_diff_onnxruntime_vs_torch"].values()) < LOGIT_ATOL
    with pytest.raises(ValueError, match="computes something else") as info:
        export_onnx(spec, tmp_path / "dyn.onnx", dynamic=True)
    assert f"> {MAX_RELATIVE_DIFF:g}" in str(info.value) and "frozen-width" in str(info.value)
    assert not (tmp_path / "dyn.onnx").exists() and not (tmp_path / "dyn.onnx.json").exists()
