"""``tag2mask bench`` end to end on synthetic benchmark layouts: results for every (benchmark, method),
the papers' table, the HTML page, re-scoring from the written predictions, kill -9 and --resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tag2mask.bench.datasets import get_spec, read_ground_truth
from tag2mask.methods.registry import bench_methods, get as registry_method, load as registry_load
from tag2mask.bench.synthetic import write_synthetic_layout
from tag2mask.cli.main import main
from tag2mask.evaluation.miou import ConfusionMatrix
from tag2mask.io.palette import read_label_png

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("voc21", "ade")  # one background dataset, one reduce-zero-label dataset
LIMIT = 4



def _runs_in_bench(method: str) -> bool:
    """Whether the bench runs ``method`` on the shipped tiny CLIP it loads by default: no inputs it cannot
    give (``needs``) and the model passes the method's own ``supports`` check (SC-CLIP wants 11+ blocks)."""
    entry = registry_method(method)
    return not entry.needs and not (entry.supports and _unsupported(method))


def _unsupported(method: str):
    from tag2mask.clip import load_clip, tiny_clip_path

    return registry_load(registry_method(method).supports)(load_clip(tiny_clip_path()))

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    names = {d: write_synthetic_layout(base / "data", d, n=LIMIT + 1, size=96) for d in DATASETS}
    return base, names


@pytest.fixture(scope="module")
def bench_run(world):
    base, _ = world
    out = base / "out"
    env_cache = os.environ.get("TAG2MASK_CACHE")
    os.environ["TAG2MASK_CACHE"] = str(base / "cache")
    try:
        rc = main(["bench", "--data", str(base / "data"), "--datasets", ",".join(DATASETS), "--methods", "all",
                   "--limit", str(LIMIT), "--out", str(out), "--quiet", "--device", "cpu"])
    finally:
        if env_cache is None:
            os.environ.pop("TAG2MASK_CACHE", None)
        else:
            os.environ["TAG2MASK_CACHE"] = env_cache
    return rc, out, base


def test_help_lists_benchmarks_layouts_and_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("voc21", "pc60", "object", "voc20", "pc59", "stuff", "city", "ade"):
        assert f"--data-{name}" in text and f"--names-{name}" in text
    for needle in ("--methods", "--preset", "--limit", "--resume", "ADEChallengeData2016", "_instanceTrainIds.png"):
        assert needle in text


@pytest.mark.slow  # shares one run of every method on VOC21 + ADE with the official name sets
def test_every_method_on_every_benchmark_gets_one_miou(bench_run):
    rc, out, _ = bench_run
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    methods = list(bench_methods())
    assert results["datasets"] == list(DATASETS) and results["methods"] == methods
    cells = {(c["dataset"], c["method"]): c for c in results["cells"]}
    assert sorted(cells) == sorted((d, m) for d in DATASETS for m in methods)
    ran = [m for m in methods if _runs_in_bench(m)]
    assert ran, "no method of the registry runs in the bench"
    for (d, m), c in cells.items():
        if m not in ran:  # needs inputs the bench cannot give, or another model: reported, not run, not a crash
            assert c["status"] == "skipped" and c["miou"] is None and c["images"] == 0
            assert all(n in c["skip_reason"] for n in registry_method(m).needs)
            if not registry_method(m).needs:
                assert c["skip_reason"] == _unsupported(m)
            assert results["table"][m][d] is None and results["table"][m]["avg"] is None
            continue
        assert c["status"] == "ran" and c["images"] == LIMIT and c["failed"] == 0
        assert c["num_classes"] == get_spec(d).num_classes and c["preset"] == f"published:{get_spec(d).config}"
        assert 0.0 <= c["miou"] <= 1.0
        assert results["table"][m][d] == round(100 * c["miou"], 2)
    for m in ran:
        row = results["table"][m]
        assert row["avg"] == round(sum(row[d] for d in DATASETS) / len(DATASETS), 2)
    assert results["speed"]["images_written"] == LIMIT * len(DATASETS) * len(ran) and results["speed"]["images_per_second"] > 0


@pytest.mark.slow  # shares one run of every method on VOC21 + ADE with the official name sets
def test_scores_equal_a_rescoring_of_the_written_predictions(bench_run):
    _, out, _ = bench_run
    results = json.loads((out / "results.json").read_text())
    for c in results["cells"]:
        if c["status"] == "skipped":
            continue
        spec = get_spec(c["dataset"])
        cm = ConfusionMatrix(c["num_classes"])
        layout = Path(c["layout"])
        keys = sorted(p.stem for p in (layout / spec.gt_dir).glob(f"*{spec.gt_suffix}"))[:LIMIT]
        for key in keys:
            pred = read_label_png(out / c["cell"] / "pred" / f"{key}.png")
            cm.update(pred, read_ground_truth(layout / spec.gt_dir / f"{key}{spec.gt_suffix}", spec))
        assert cm.scores("gt_or_pred")["Mean IoU"] == pytest.approx(c["miou"], abs=1e-12)


@pytest.mark.slow  # shares one run of every method on VOC21 + ADE with the official name sets
def test_markdown_csv_and_html_reports(bench_run):
    _, out, _ = bench_run
    results = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    titles = [get_spec(d).title for d in DATASETS]
    assert f"| Method | {' | '.join(titles)} | Avg ({len(DATASETS)}) |" in md
    for m in results["methods"]:
        assert sum(line.startswith(f"| {m} |") for line in md.splitlines()) == 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(results["cells"]) and {r["method"] for r in rows} == set(results["methods"])
    page = (out / "index.html").read_text()
    assert "<svg" in page and all(t in page for t in titles)
    links = [part.split("'")[0] for part in page.split("<img src='")[1:]]
    ran = [m for m in results["methods"] if _runs_in_bench(m)]
    assert len(links) == len(DATASETS) * 3 * (1 + len(ran))  # 3 overlays: gt + every method that ran
    assert all((out / link).is_file() for link in links)


def test_layout_problems_fail_before_the_model_with_the_fix(tmp_path, capsys):
    rc = main(["bench", "--data", str(tmp_path), "--datasets", "voc21,city", "--out", str(tmp_path / "o"),
               "--weights", str(tmp_path / "no-such-weights.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "VOCdevkit/VOC2012" in err and "cityscapes.py" in err and "--data-city" in err
    assert "no-such-weights" not in err


def test_options_that_do_not_apply_are_errors(tmp_path, capsys):
    rc = main(["bench", "--data", str(tmp_path), "--datasets", "voc21", "--data-ade", str(tmp_path),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "--data-ade" in capsys.readouterr().err
    rc = main(["bench", "--data", str(tmp_path), "--methods", "sclip,nope", "--datasets", "voc21",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_a_bad_image_is_reported_and_the_rest_scored(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    names = write_synthetic_layout(tmp_path / "data", "voc20", n=3, size=64)
    spec = get_spec("voc20")
    gts = sorted((tmp_path / "data" / spec.folders[0] / spec.gt_dir).glob("*.png"))
    from PIL import Image

    Image.fromarray(np.zeros((10, 12), np.uint8)).save(gts[1])  # ground truth of another size
    rc = main(["bench", "--data", str(tmp_path / "data"), "--datasets", "voc20", "--methods", "sclip",
               "--names-voc20", str(names), "--out", str(tmp_path / "o"), "--quiet", "--device", "cpu"])
    assert rc == 1
    cell = json.loads((tmp_path / "o" / "results.json").read_text())["cells"][0]
    assert cell["images"] == 2 and cell["failed"] == 1 and cell["failures"][0]["error_kind"] == "size"
    assert "\u2020" in (tmp_path / "o" / "results.md").read_text()


def _bench_cmd(base: Path, names: dict, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "tag2mask", "bench", "--data", str(base / "data"), "--datasets", ",".join(DATASETS),
           "--methods", "sclip,naclip", "--limit", str(LIMIT), "--out", str(out), "--quiet", "--device", "cpu",
           "--resume"]
    for d, path in names.items():
        cmd += [f"--names-{d}", str(path)]
    return cmd


@pytest.fixture(scope="module")
def clean_run(world, tmp_path_factory):
    """An uninterrupted one-process run of two methods with the synthetic name sets (the reference)."""
    base, names = world
    tmp = tmp_path_factory.mktemp("clean")
    env = dict(os.environ, OMP_NUM_THREADS="1", TAG2MASK_CACHE=str(tmp / "cache"), PYTHONPATH=str(ROOT))
    done = subprocess.run(_bench_cmd(base, names, tmp / "out"), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=500)
    assert done.returncode == 0, done.stderr
    return env, tmp / "out"


@pytest.mark.slow
def test_kill_then_resume_gives_the_same_table(world, clean_run, tmp_path):
    base, names = world
    env, clean = clean_run
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_bench_cmd(base, names, killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # kill -9 once the second cell has written an image
        if any(p.read_bytes().count(b"\n") for p in killed.glob("cells/*/naclip/manifest.rank0.jsonl")):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (killed / "results.json").exists()
    resumed = subprocess.run(_bench_cmd(base, names, killed), env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=500)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (json.loads((d / "results.json").read_text()) for d in (clean, killed))
    assert a["table"] == b["table"]
    assert (clean / "results.md").read_text() == (killed / "results.md").read_text()
    first = next(c for c in b["cells"] if (c["dataset"], c["method"]) == (DATASETS[0], "sclip"))
    assert first["written"] == 0 and first["skipped"] == LIMIT  # a finished cell is not recomputed
    assert sum(c["skipped"] for c in b["cells"]) > LIMIT  # the killed cell kept its finished images


@pytest.mark.slow
def test_torchrun_shards_every_cell_and_gives_the_same_table(world, clean_run, tmp_path):
    base, names = world
    env, clean = clean_run
    out = tmp_path / "two"
    cmd = _bench_cmd(base, names, out)
    cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tag2mask"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (clean, out))
    assert a["table"] == b["table"]
    for c in b["cells"]:
        ranks = [json.loads(line)["rank"] for line in (out / c["cell"] / "manifest.jsonl").read_text().splitlines()]
        assert sorted(set(ranks)) == [0, 1] and len(ranks) == LIMIT


def test_a_larger_limit_with_resume_adds_only_the_new_images(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    names = write_synthetic_layout(tmp_path / "data", "voc20", n=3, size=64)
    argv = ["bench", "--data", str(tmp_path / "data"), "--datasets", "voc20", "--methods", "sclip", "--names-voc20",
            str(names), "--out", str(tmp_path / "o"), "--quiet", "--device", "cpu", "--preset", "default", "--resume"]
    assert main(argv + ["--limit", "2"]) == 0
    assert main(argv + ["--limit", "3"]) == 0
    cell = json.loads((tmp_path / "o" / "results.json").read_text())["cells"][0]
    assert (cell["images"], cell["written"], cell["skipped"]) == (3, 1, 2)
    assert cell["preset"] == "default"
    settings = json.loads((tmp_path / "o" / cell["cell"] / "settings.json").read_text())
    assert settings["resolved"]["name"] == "default"
    # the same folder with other settings is refused (the batch runner's settings guard)
    other = [("published" if a == "default" else a) for a in argv]
    assert main(other) == 2
