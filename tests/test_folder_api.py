"""`tag2mask.label_folder` / `segment_folder`: the CLI's batch machinery from Python (resume, bad items)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def photos(tmp_path) -> Path:
    from tag2mask.synth import export_voc

    export_voc(tmp_path / "w", {"train": 3}, size=64)
    return tmp_path / "w" / "JPEGImages"


def test_segment_folder_resumes_and_reports_bad_items(photos, tmp_path):
    import tag2mask

    (photos / "broken.png").write_bytes(b"not an image")
    run = tag2mask.segment_folder(photos, tmp_path / "out", classes="star, ring, background: grass", device="cpu")
    good = sorted(p.stem for p in photos.iterdir() if p.stem != "broken")
    assert run.exit_code == 1 and run.done == good and list(run.failed) == ["broken"]
    manifest = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == len(good) + 1
    (photos / "broken.png").unlink()
    again = tag2mask.segment_folder(photos, tmp_path / "out", classes="star, ring, background: grass",
                                    device="cpu", resume=True)
    assert again.done == good and again.exit_code == 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["command"] == "segment"


def test_options_are_checked(photos, tmp_path):
    import tag2mask

    with pytest.raises(TypeError, match="no_such_option"):
        tag2mask.segment_folder(photos, tmp_path / "o", classes="star", no_such_option=1)
    with pytest.raises(ValueError, match="--method"):
        tag2mask.segment_folder(photos, tmp_path / "o", classes="star", method="nope")
    assert not (tmp_path / "o").exists()


def test_label_folder_writes_the_label_run(photos, tmp_path):
    import tag2mask

    run = tag2mask.label_folder(photos.parent, tmp_path / "seeds", classes="synth", split="train", refine="none",
                                device="cpu", save_arrays=True)
    assert run.exit_code == 0 and len(run.done) == 3 and run.failed == {}
    assert len(list((tmp_path / "seeds" / "masks").glob("*.png"))) == 3
    assert json.loads((tmp_path / "seeds" / "run.json").read_text())["settings"]["save_arrays"] is True


def test_import_tag2mask_stays_light():
    """The folder API is imported on first use: `import tag2mask` loads neither torch nor the CLI."""
    code = ("import sys, tag2mask; assert 'torch' not in sys.modules and 'tag2mask.api' not in sys.modules; "
            "tag2mask.label_folder; assert 'tag2mask.api' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "ok"
