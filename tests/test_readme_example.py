"""The README's Python example, parsed out of README.md: it runs as written, and its real-weights line
gives the official CLIP-ES numbers (the method applies its numerics; nothing else to remember)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from golden_sets import CASES, TINY_CLIP_PATH

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    examples = [b for b in blocks if "ClipES(" in b]
    assert len(examples) == 1, "README.md should hold exactly one ClipES example"
    return examples[0]


def test_readme_example_runs_as_written():
    code = _python_example()
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    result, label_ids = namespace["result"], namespace["label_ids"]
    assert result.cams.dtype == np.float16 and result.cams.shape[0] == len(label_ids) > 0
    assert result.cams.shape[1:] == namespace["image"].size[::-1]
    assert list(result.keys) == label_ids and out.getvalue().strip()


def _real_weights_line(code: str) -> str:
    """The commented real-weights assignment, pointed at the golden model on the CPU."""
    line = next(ln for ln in code.splitlines() if ln.lstrip().startswith("#") and "load_clip(" in ln)
    statement = line.split(":", 1)[1].strip() if "real weights:" in line else line.lstrip("# ").strip()
    assert "preset_for(" in statement and "load_clip(" in statement
    weights = re.search(r'load_clip\("([^"]+)"', statement).group(1)
    return statement.replace(weights, str(TINY_CLIP_PATH)).replace('"cuda"', '"cpu"')


def _real_weights_preset() -> str:
    return re.search(r'preset_for\("(\w+)"\)', _real_weights_line(_python_example())).group(1)


@pytest.mark.parametrize("case", [c for c in CASES if c.set.preset_name() == _real_weights_preset()], ids=lambda c: c.id)
def test_readme_real_weights_flow_gives_official_numbers(case):
    """README flow (plain ``load_clip`` + ``ClipES(model, config=preset)``) vs the official fixture arrays."""
    from PIL import Image

    code = _python_example()
    imports = "\n".join(ln for ln in code.splitlines() if ln.startswith(("from ", "import ")))
    namespace: dict = {}
    exec(imports + "\n" + _real_weights_line(code) + "\ncam_maker = ClipES(model, config=preset)", namespace)  # noqa: S102
    cam_maker = namespace["cam_maker"]
    with Image.open(case.path("image")) as image:
        result = cam_maker(image, case.entry["label_ids"], keep_arrays=True)
    tol = case.entry["suggested_tolerance"]
    for k in range(len(case.entry["label_ids"])):
        err = np.abs(result.arrays["cam_lowres"][k] - case.arrays["cam_lowres"][k]).max()
        assert err <= tol["cam_lowres_end_to_end"][k], (k, err)
        high = np.abs(result.cams[k].astype(np.float32) - case.arrays["attn_highres"][k].astype(np.float32)).max()
        assert high <= tol["attn_highres_end_to_end"][k]


def test_readme_folder_api_example_runs_as_written(monkeypatch, tmp_path):
    """README's `tag2mask.label_folder` / `segment_folder` example: both folders written, nothing failed."""
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    examples = [b for b in blocks if "label_folder(" in b]
    assert len(examples) == 1, "README.md should hold exactly one folder-API example"
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(examples[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    seeds, masks, work = namespace["seeds"], namespace["masks"], namespace["work"]
    photos = sorted(p.stem for p in (work / "world" / "JPEGImages").iterdir())
    assert seeds.exit_code == 0 and seeds.failed == {} and len(seeds.done) == len(photos) > 0
    assert masks.exit_code == 0 and masks.failed == {} and len(masks.done) == len(photos)
    assert sorted(p.stem for p in (seeds.out / "masks").glob("*.png")) == photos
    assert sorted(p.stem for p in (masks.out / "masks").glob("*.png")) == photos
    assert out.getvalue().split()[0] == str(len(photos))
