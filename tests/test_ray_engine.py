"""``tag2mask label|segment --engine ray``: Ray Data actors write what the local engine writes, byte for byte
(``label`` with CLIP-ES, FMA and TagCLIP, ``segment`` with the open-vocabulary methods and trained runs), a
Ray run killed mid-way continues with ``--resume`` to the same outputs (our manifest is the record of truth),
and inputs named by a ``file://`` URI (read through pyarrow.fs) give the local folder's outputs.

Ray is an optional extra (``tag2mask[ray]``, also in ``test``); the module is skipped where it is not
installed. One local Ray cluster (``ray start --head``) serves the module, so the CLI runs join it with
``--address`` instead of paying Ray's start-up on every run."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")  # optional third-party extra
pytest.importorskip("ray.data")

ROOT = Path(__file__).resolve().parents[1]
#: manifest fields that differ between any two runs (when, how long, which process)
VOLATILE = ("time", "seconds", "rank", "traceback")
#: run.json fields that say how and when it ran, not what it wrote
RUN_VOLATILE = ("seconds", "images_per_second", "per_rank", "workers", "batch_size", "engine")


def _corpus(root: Path, n: int = 8) -> Path:
    """Images with flat regions, nested names, a downscaled one and bad items (corrupt, empty labels, missing)."""
    rng = np.random.default_rng(5)
    images = root / "images"
    labels = {}
    for i in range(n):
        h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
        name = f"sub/im{i}.png" if i == 3 else f"im{i}.png"
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((w, h), Image.NEAREST).save(images / name)
        labels[name] = [["cat", "dog"], ["person"], ["cat", "person", "car"]][i % 3]
    Image.fromarray(rng.integers(0, 255, (130, 120, 3), dtype=np.uint8)).save(images / "big.png")  # > --max-pixels
    labels["big.png"] = ["dog"]
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    labels["broken.png"] = ["cat"]
    labels["gone.png"] = ["cat"]  # listed, not on disk
    labels["none.png"] = []
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / "none.png")
    (root / "labels.json").write_text(json.dumps(labels))
    return images


#: the test cluster's own token (Ray's default, ~/.ray/auth_token, is rewritten by any other local cluster)
RAY_TOKEN = secrets.token_hex(32)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TAG2MASK_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def _cmd(weights: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tag2mask", "label", str(images), "--labels", str(images.parent / "labels.json"),
            "--classes", "voc", "--weights", str(weights), "--out", str(out), "--refine", "pamr", "--device", "cpu",
            "--max-pixels", "4000", "--save-arrays", "--quiet", *extra]


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for sub in ("masks", "cams", "arrays") for p in sorted((out / sub).rglob("*")) if p.is_file()}


def _manifest(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def _report(out: Path, also: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in json.loads((out / "run.json").read_text()).items() if k not in RUN_VOLATILE + also}


def _assert_same(a: Path, b: Path, resumed: bool = False) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []
    assert _manifest(a) == _manifest(b)
    also = ("written", "skipped") if resumed else ()  # a resumed run counts what it skipped
    assert _report(a, also) == _report(b, also)


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A local 2-CPU Ray cluster for the module (stopped at the end)."""
    tmp = tmp_path_factory.mktemp("ray")
    env = _env(tmp)
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = "6391"
    subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--port", port, "--include-dashboard", "false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_clip_path):
    """The local engine's outputs on the corpus (the reference)."""
    tmp = tmp_path_factory.mktemp("local")
    images = _corpus(tmp)
    proc = subprocess.run(_cmd(tiny_clip_path, images, tmp / "local"), env=_env(tmp), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # the bad items fail, the others are written
    return images, tmp / "local"


@pytest.mark.slow
def test_two_ray_workers_write_what_the_local_engine_writes(local_run, ray_address, tiny_clip_path, tmp_path):
    images, local = local_run
    out = tmp_path / "ray"
    proc = subprocess.run(_cmd(tiny_clip_path, images, out, "--engine", "ray", "--workers", "2",
                               "--address", ray_address), env=_env(tmp_path), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    _assert_same(local, out)
    kinds = {r["item"]: r.get("error_kind") for r in _manifest(out) if r["status"] == "error"}
    assert kinds == {"broken": "decode", "gone": "decode", "none": "labels"}
    engine = json.loads((out / "run.json").read_text())["engine"]
    assert engine["engine"] == "ray" and engine["ray_workers"] == 2 and engine["ray_threads_per_worker"] == 1


@pytest.mark.slow
def test_killed_ray_run_resumes_to_the_same_outputs(local_run, ray_address, tiny_clip_path, tmp_path):
    images, local = local_run
    out = tmp_path / "ray"
    cmd = _cmd(tiny_clip_path, images, out, "--engine", "ray", "--workers", "2", "--address", ray_address)
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rank_file, deadline = out / "manifest.rank0.jsonl", time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if rank_file.exists() and rank_file.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    recorded = rank_file.read_bytes().count(b"\n")
    assert 3 <= recorded < len(_manifest(local))
    done = subprocess.run(cmd + ["--resume"], env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    _assert_same(local, out, resumed=True)
    summary = json.loads((out / "run.json").read_text())
    assert summary["skipped"] >= 1  # what the killed run recorded as ok was not redone
    assert not list(out.rglob("*.tmp*")) and not rank_file.exists()


@pytest.mark.slow
def test_segment_with_ray_writes_what_the_local_engine_writes(local_run, ray_address, tiny_clip_path, tmp_path):
    images = local_run[0]
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        extra = ["--engine", "ray", "--workers", "2", "--address", ray_address] if engine == "ray" else []
        cmd = [sys.executable, "-m", "tag2mask", "segment", str(images), "--classes", "cat, dog; background: sky",
               "--weights", str(tiny_clip_path), "--device", "cpu", "--out", str(outs[engine]), "--overlay",
               "--save-logits", "--quiet", *extra]
        proc = subprocess.run(cmd, env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr  # broken.png fails
    files = {e: {p.relative_to(o).as_posix(): p.read_bytes() for sub in ("masks", "overlays", "logits")
                 for p in sorted((o / sub).rglob("*")) if p.is_file()} for e, o in outs.items()}
    assert files["local"] and files["local"] == files["ray"]
    assert _manifest(outs["local"]) == _manifest(outs["ray"])
    local, ray_report = _report(outs["local"]), _report(outs["ray"])
    for report in (local, ray_report):  # per-image timings
        for entry in report.pop("images"):
            entry.pop("seconds", None)
    assert local == ray_report


@pytest.mark.slow
def test_synthetic_world_voc_root_with_two_ray_workers(ray_address, tiny_clip_path, tmp_path):
    """The synthetic world exported as a VOC root (labels from its Annotations), --classes synth."""
    env = _env(tmp_path)
    subprocess.run([sys.executable, "-m", "tag2mask", "synth", "export", "--out", str(tmp_path / "world"), "--n", "6",
                    "--size", "64", "--quiet"], env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        extra = ["--engine", "ray", "--workers", "2", "--address", ray_address] if engine == "ray" else []
        cmd = [sys.executable, "-m", "tag2mask", "label", str(tmp_path / "world"), "--split", "train", "--classes",
               "synth", "--weights", str(tiny_clip_path), "--device", "cpu", "--out", str(outs[engine]),
               "--save-arrays", "--quiet", *extra]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert len(_files(outs["local"])) == 3 * 6
    _assert_same(outs["local"], outs["ray"])


# --- every label / segment path on Ray: fma, tagclip, segment --checkpoint (one world, one cluster) --------

RUNS_V0 = Path(__file__).parent / "data" / "runs_v0"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small synthetic world exported as a VOC root."""
    root = tmp_path_factory.mktemp("world") / "world"
    subprocess.run([sys.executable, "-m", "tag2mask", "synth", "export", "--out", str(root), "--n", "4", "--size", "64",
                    "--quiet"], env=_env(root.parent), cwd=ROOT, check=True, capture_output=True, timeout=120)
    return root


def _tree(out: Path) -> dict[str, bytes]:
    """Every output file of a run folder but its records (run.json, manifests) and logs."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("run.json", "manifest.jsonl") and "logs" not in p.relative_to(out).parts}


def _records(out: Path) -> dict[str, object]:
    """Every manifest and run.json of a run folder (also a nested job's), without what says how / when it ran;
    the output folder's own path reads OUT."""
    found: dict[str, object] = {}
    for p in sorted(out.rglob("manifest.jsonl")):
        found[p.relative_to(out).as_posix()] = _manifest(p.parent)
    for p in sorted(out.rglob("run.json")):
        report = _report(p.parent)
        for entry in report.get("images", []):  # segment's per-image timings
            entry.pop("seconds", None)
        found[p.relative_to(out).as_posix()] = report
    return json.loads(json.dumps(found).replace(json.dumps(str(out))[1:-1], "OUT"))


def _local_and_ray(cmd: list[str], tmp_path: Path, ray_address: str, code: int = 0) -> tuple[Path, Path]:
    """Run ``cmd + --out DIR`` with the local engine and with 2 Ray actors; both must exit with ``code``."""
    outs = []
    for engine in ("local", "ray"):
        out = tmp_path / engine
        extra = ["--engine", "ray", "--workers", "2", "--address", ray_address] if engine == "ray" else []
        proc = subprocess.run([sys.executable, "-m", "tag2mask", *cmd, "--out", str(out), "--quiet", *extra],
                              env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, proc.stderr
        outs.append(out)
    return outs[0], outs[1]


def _assert_same_tree(local: Path, ray_out: Path) -> None:
    a, b = _tree(local), _tree(ray_out)
    assert a and sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert _records(local) == _records(ray_out)
    engine = json.loads((ray_out / "run.json").read_text())["engine"]
    assert engine["engine"] == "ray" and engine["ray_workers"] == 2


@pytest.mark.slow
def test_fma_label_with_ray_writes_what_the_local_engine_writes(world, ray_address, tiny_clip_path, tmp_path):
    from tag2mask.engine.loop import RunOptions
    from tag2mask.methods.fma.prompt_run import FMATrainConfig
    from tag2mask.methods.fma.train_task import FMAData, train_fma
    from tag2mask.vocab.vocabulary import get_vocabulary

    v = get_vocabulary("synth")  # a two-iteration prompts run on the world's classes
    config = FMATrainConfig.build("synth", "cls", v.names, [",".join(s) for s in v.synonyms], v.background,
                                  max_iters=2, warmup_iters=1, batch_size=2, augment_long_side=(64, 72),
                                  augment_short_side_min=64, augment_crop=64)
    prompts = tmp_path / "prompts"
    train_fma(config, FMAData("synth", "train", synth_n=2, synth_size=64, weights=str(tiny_clip_path)),
              RunOptions(out_dir=str(prompts), device="cpu", progress=False))
    local, ray_out = _local_and_ray(["label", str(world), "--split", "train", "--method", "fma", "--prompts",
                                     str(prompts), "--proposals", "slic", "--save-proposals", "--save-arrays",
                                     "--device", "cpu"], tmp_path, ray_address)
    _assert_same_tree(local, ray_out)
    assert any(k.startswith("proposals/") for k in _tree(ray_out))  # the finish stage built SLIC in the actor


@pytest.mark.slow
def test_tagclip_label_with_ray_writes_what_the_local_engine_writes(world, ray_address, tiny_clip_path, tmp_path):
    """Both jobs of ``--method tagclip`` (the tags, then CLIP-ES with TagCLIP's affinity) run on Ray."""
    local, ray_out = _local_and_ray(["label", str(world / "JPEGImages"), "--method", "tagclip", "--classes", "synth",
                                     "--weights", str(tiny_clip_path), "--refine", "pamr", "--save-arrays",
                                     "--device", "cpu"], tmp_path, ray_address)
    _assert_same_tree(local, ray_out)
    assert any(k.startswith("tagclip/scores/") for k in _tree(ray_out))
    tag_engine = json.loads((ray_out / "tagclip" / "run.json").read_text())["engine"]
    assert tag_engine["engine"] == "ray" and tag_engine["ray_workers"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", json.loads((RUNS_V0 / "index.json").read_text())["runs"], ids=lambda c: c["run"])
def test_segment_checkpoint_with_ray_writes_what_the_local_engine_writes(case, ray_address, tmp_path):
    """``segment --checkpoint RUN`` of the trained runs of ``tests/data/runs_v0`` (its ``index.json``)."""
    from tag2mask.clip.shipped import SHIPPED_WEIGHTS

    weights = ["--weights", str(SHIPPED_WEIGHTS)] if case["clip_weights"] == "shipped" else []
    local, ray_out = _local_and_ray(["segment", str(RUNS_V0 / case["images"]), "--checkpoint", str(RUNS_V0 / case["run"]),
                                     "--save-logits", "--overlay", "--device", "cpu", *weights], tmp_path, ray_address)
    _assert_same_tree(local, ray_out)
    assert sorted(p.stem for p in (ray_out / "masks").iterdir()) == sorted(p.stem for p in (RUNS_V0 / case["images"]).iterdir())


@pytest.mark.slow
def test_uri_input_writes_what_the_local_folder_writes(local_run, ray_address, tiny_clip_path, tmp_path):
    """``segment file:///...`` (listed and read through pyarrow.fs, decoded by our decoder) with the local engine
    and with 2 Ray actors writes what the local folder does: same files, same records but the input's name."""
    images = local_run[0]
    uri = images.resolve().as_uri()
    outs = {}
    for name, source, extra in (("folder", str(images), []), ("uri", uri, []),
                                ("uri_ray", uri, ["--engine", "ray", "--workers", "2", "--address", ray_address])):
        outs[name] = tmp_path / name
        cmd = [sys.executable, "-m", "tag2mask", "segment", source, "--classes", "cat, dog; background: sky",
               "--weights", str(tiny_clip_path), "--device", "cpu", "--out", str(outs[name]), "--overlay",
               "--save-logits", "--max-pixels", "4000", "--quiet", *extra]
        proc = subprocess.run(cmd, env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr  # broken.png fails
    want = _tree(outs["folder"])
    assert "overlays/big.png" in want  # a downscaled image's overlay: drawn on the full-size decoded bytes
    records = json.loads(json.dumps(_records(outs["folder"])).replace(json.dumps(str(outs["folder"]))[1:-1], "OUT"))
    for name in ("uri", "uri_ray"):
        got = _tree(outs[name])
        assert sorted(got) == sorted(want) and [k for k in want if want[k] != got[k]] == []
        named = json.dumps(_records(outs[name])).replace(uri, str(images.resolve()))
        assert json.loads(named) == records
    kinds = {r["item"]: r.get("error_kind") for r in _manifest(outs["uri_ray"]) if r["status"] == "error"}
    assert kinds == {"broken": "decode"}


@pytest.mark.slow
def test_label_from_a_uri_with_ray_writes_what_the_local_folder_writes(local_run, ray_address, tiny_clip_path, tmp_path):
    """``label file:///... --labels`` on 2 Ray actors (keys listed and read through pyarrow.fs): the local
    folder's files, byte for byte, and its records but the inputs' names (nested keys, bad items included)."""
    images, local = local_run
    uri = images.resolve().as_uri()
    out = tmp_path / "ray"
    cmd = _cmd(tiny_clip_path, images, out, "--engine", "ray", "--workers", "2", "--address", ray_address)
    cmd[cmd.index(str(images))] = uri
    proc = subprocess.run(cmd, env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    fa, fb = _files(local), _files(out)
    assert "masks/sub/im3.png" in fa and sorted(fa) == sorted(fb) and [k for k in fa if fa[k] != fb[k]] == []
    named = json.loads(json.dumps(_manifest(out)).replace(uri, str(images.resolve())))
    assert named == _manifest(local)
    kinds = {r["item"]: r.get("error_kind") for r in _manifest(out) if r["status"] == "error"}
    assert kinds == {"broken": "decode", "gone": "decode", "none": "labels"}
