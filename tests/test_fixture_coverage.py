"""Every array of every golden-fixture set under ``tests/data`` is read by some test.

The arrays are listed from the sets themselves (each ``*.npz`` file's keys, every set folder), so a
new set or a new array fails here until a test compares it. "Read by a test" means the array's name
(or a tail of it after a ``_`` / ``.`` separator; digits match either digits or an f-string field
such as ``{i}``) ends a string literal of a test module that names the set's folder:
``fx["img0_clip_feats"]``, ``fx[f"{branch}_img{i}_boxes"]`` and ``z[f"block{i}_out"]`` all count. A
name that only appears in this file, or only in the tests of another set, does not.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

TESTS = Path(__file__).parent
DATA = TESTS / "data"
_DIGITS = r"(?:\d+|\{[^{}]*\})"  # a number in the key: literal digits or an f-string field


def _sources(set_name: str) -> str:
    """Test modules (and helpers) that name the fixture folder ``set_name`` as a string."""
    texts = [p.read_text() for p in sorted(TESTS.glob("*.py")) if p.name != Path(__file__).name]
    return "\n".join(t for t in texts if re.search(rf"['\"/]{re.escape(set_name)}['\"/]", t))


def _fixture_arrays() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for npz in sorted(DATA.rglob("*.npz")):
        with np.load(npz) as z:
            out[str(npz.relative_to(DATA))] = list(z.files)
    return out


def _tails(key: str) -> list[str]:
    """Regexes of the key and of its tails after each separator (long enough to be specific)."""
    starts = [0] + [m.end() for m in re.finditer(r"[_.]", key)]
    pats = []
    for s in starts:
        tail = key[s:]
        if not re.sub(r"\d", "", tail):
            continue
        pats.append("".join(_DIGITS if part.isdigit() else re.escape(part) for part in re.split(r"(\d+)", tail) if part))
    return pats


def _is_read(key: str, source: str) -> bool:
    for pat in _tails(key):
        # the tail ends a string literal and starts it or follows a separator / an f-string field
        if re.search(rf"(?:['\"]|[_.}}]){pat}['\"]", source):
            return True
    return False


def test_every_fixture_array_is_compared_by_a_test() -> None:
    arrays = _fixture_arrays()
    assert arrays, f"no fixture sets under {DATA}"
    sources = {f.split("/")[0]: _sources(f.split("/")[0]) for f in arrays}
    missing = [f"{f}:{k}" for f, keys in arrays.items() for k in keys if not _is_read(k, sources[f.split("/")[0]])]
    assert not missing, f"{len(missing)} fixture arrays no test reads: {missing}"


def test_the_check_has_teeth() -> None:
    """A name no test uses is reported; digit fields and f-string tails are recognised."""
    assert not _is_read("no_such_array_anywhere", _sources("weclip"))
    assert _sources("weclip") and not _sources("no_such_set")
    assert _is_read("caa_img0_cams_after_par", 'fx[f"{branch}_img{i}_cams_after_par"]')
    assert _is_read("block11_out", 'z[f"block{b}_out"]')
    assert not _is_read("caa_img0_cams_after_par", "cams_after_par = 1  # not a string literal")
