"""``hf://USER/REPO[@REV]`` run names and ``--allow-download``: without the flag huggingface_hub is asked for
the local cache only (``local_files_only=True``), with it for a download (``local_files_only=False``), and
the folder it returns is what ``segment --checkpoint`` and ``export`` read. No network: huggingface_hub's
``snapshot_download`` is replaced by a recorder that serves a hub-style folder written by ``export --hub``.

The runs are those of ``tests/data/runs_v0`` (listed in its ``index.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

hub = pytest.importorskip("huggingface_hub")  # optional third-party extra 'hub'

from tag2mask.cli.main import main  # noqa: E402

ROOT = Path(__file__).parent / "data" / "runs_v0"
RUNS = json.loads((ROOT / "index.json").read_text())["runs"]


def _weights(case: dict) -> list[str]:
    from tag2mask.clip.shipped import SHIPPED_WEIGHTS

    return ["--weights", str(SHIPPED_WEIGHTS)] if case["clip_weights"] == "shipped" else []


class _Hub:
    """Stands in for ``huggingface_hub.snapshot_download``: records each call; the folder is 'cached' only
    after a call that may download."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.calls, self.cached = folder, [], False

    def __call__(self, repo_id, revision=None, local_files_only=False, **kwargs):
        self.calls.append({"repo": repo_id, "revision": revision, "local_files_only": local_files_only})
        if local_files_only and not self.cached:
            raise FileNotFoundError(f"{repo_id} is not in the cache")  # huggingface_hub raises its own kind
        self.cached = True
        return str(self.folder)


@pytest.mark.parametrize("case", RUNS, ids=[r["run"] for r in RUNS])
def test_allow_download_maps_onto_local_files_only(case, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "snapshot"
    assert main(["export", str(ROOT / case["run"]), "--hub", str(folder)]) == 0
    fake = _Hub(folder)
    monkeypatch.setattr(hub, "snapshot_download", fake)
    monkeypatch.delenv("TAG2MASK_ALLOW_DOWNLOAD", raising=False)
    name = "hf://someone/tiny-run@v1"
    seg = ["segment", str(ROOT / case["images"]), "--checkpoint", name, "--quiet", "--device", "cpu", *_weights(case)]
    capsys.readouterr()

    # without the flag: the local cache only, and a clear line naming the flag and the fetch command
    assert main(seg + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert name in err and "--allow-download" in err and "hf download someone/tiny-run --revision v1" in err
    assert fake.calls and all(c["local_files_only"] is True for c in fake.calls)
    assert not (tmp_path / "a" / "masks").exists()

    # with it: a download is allowed, and the returned folder is the run that segments the images
    fake.calls.clear()
    assert main(seg + ["--out", str(tmp_path / "b"), "--allow-download"]) == 0
    assert {"repo": "someone/tiny-run", "revision": "v1", "local_files_only": False} in fake.calls
    masks = sorted(p.stem for p in (tmp_path / "b" / "masks").iterdir())
    assert masks == sorted(p.stem for p in (ROOT / case["images"]).iterdir())
    assert json.loads((tmp_path / "b" / "run.json").read_text())["checkpoint"] == str(folder / "model.safetensors")

    # export takes the flag too; now 'cached', the same name also resolves without it
    fake.calls.clear()
    assert main(["export", name, "--hub", str(tmp_path / "again"), "--allow-download"]) == 0
    assert fake.calls[-1]["local_files_only"] is False
    assert main(["export", name, "--hub", str(tmp_path / "again2")]) == 0
    assert fake.calls[-1]["local_files_only"] is True
    # the environment's TAG2MASK_ALLOW_DOWNLOAD=1 stands for the flag, as it does for CLIP weights
    monkeypatch.setenv("TAG2MASK_ALLOW_DOWNLOAD", "1")
    assert main(["export", name, "--hub", str(tmp_path / "again3")]) == 0
    assert fake.calls[-1]["local_files_only"] is False
    task = json.loads((folder / "config.json").read_text())["task"]
    assert json.loads((tmp_path / "again" / "config.json").read_text())["task"] == task


@pytest.mark.parametrize("case", RUNS, ids=[r["run"] for r in RUNS])
def test_allow_download_with_a_local_run_is_an_error(case, tmp_path, capsys):
    run = str(ROOT / case["run"])
    assert main(["export", run, "--hub", str(tmp_path / "h"), "--allow-download"]) == 2
    assert "hf://" in capsys.readouterr().err and not (tmp_path / "h").exists()
    assert main(["segment", str(ROOT / case["images"]), "--checkpoint", run, "--out", str(tmp_path / "s"),
                 "--allow-download", "--device", "cpu", *_weights(case)]) == 2
    assert "--allow-download" in capsys.readouterr().err and not (tmp_path / "s").exists()
