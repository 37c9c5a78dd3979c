"""Every array of every golden-fixture set under ``tests/data`` is read by some test.

The arrays are listed from the sets themselves (each ``*.npz`` file's keys, every set folder), so a
new set or a new array fails here until a test compares it. "Read by a test" means the array's name
(or a tail of it after a ``_`` / ``.`` separator; digits match either digits or an f-string field
such as ``{i}``) ends a string literal of a test module that names the set's folder:
``fx["img0_clip_feats"]``, ``fx[f"{branch}_img{i}_boxes"]`` and ``z[f"block{i}_out"]`` all count. An
array whose name is a value in the set's ``index.json`` (``"input_key": "input_s96"``) also counts
when a test reads that index field (``case["input_key"]``). A name that only appears in this file,
or only in the tests of another set, does not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

TESTS = Path(__file__).parent
DATA = TESTS / "data"
_DIGITS = r"(?:\d+|\{[^{}]*\})"  # a number in the key: literal digits or an f-string field


def _sources(set_name: str) -> str:
    """Test modules that name the fixture folder ``set_name`` as a string, or that import a helper
    module of ``tests/`` which does (``fma_data``, ``golden_sets`` ...)."""
    texts = {p.stem: p.read_text() for p in sorted(TESTS.glob("*.py")) if p.name != Path(__file__).name}
    naming = {m for m, t in texts.items() if re.search(rf"['\"/]{re.escape(set_name)}['\"/]", t)}
    if set_name in _golden_set_ids():  # golden_sets discovers the CLIP-ES-format sets from index.json
        naming.add("golden_sets")
    helpers = {m for m in naming if not m.startswith("test_")}
    users = {m for m, t in texts.items()
             if any(re.search(rf"^(?:from {h} import|import {h}\b)", t, re.M) for h in helpers)}
    return "\n".join(texts[m] for m in sorted(naming | users))


def _golden_set_ids() -> list[str]:
    from golden_sets import SET_IDS

    return list(SET_IDS)


def _fixture_arrays() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for npz in sorted(DATA.rglob("*.npz")):
        with np.load(npz) as z:
            out[str(npz.relative_to(DATA))] = list(z.files)
    return out


def _index_fields(set_dir: Path) -> dict[str, set[str]]:
    """Array name -> the ``index.json`` fields whose value is that name (tests may read arrays by them)."""
    index = set_dir / "index.json"
    out: dict[str, set[str]] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str):
                    out.setdefault(v, set()).add(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    if index.exists():
        walk(json.loads(index.read_text()))
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
    sets = {f.split("/")[0] for f in arrays}
    sources = {s: _sources(s) for s in sets}
    fields = {s: _index_fields(DATA / s) for s in sets}
    missing = []
    for f, keys in arrays.items():
        src, by_field = sources[f.split("/")[0]], fields[f.split("/")[0]]
        for k in keys:
            via_index = any(re.search(rf"\[['\"]{re.escape(field)}['\"]\]", src) for field in by_field.get(k, ()))
            if not (_is_read(k, src) or via_index):
                missing.append(f"{f}:{k}")
    assert not missing, f"{len(missing)} fixture arrays no test reads: {missing}"


def test_the_check_has_teeth() -> None:
    """A name no test uses is reported; digit fields and f-string tails are recognised."""
    assert not _is_read("no_such_array_anywhere", _sources("weclip"))
    assert _sources("weclip") and not _sources("no_such_set")
    assert _is_read("caa_img0_cams_after_par", 'fx[f"{branch}_img{i}_cams_after_par"]')
    assert _is_read("block11_out", 'z[f"block{b}_out"]')
    assert not _is_read("caa_img0_cams_after_par", "cams_after_par = 1  # not a string literal")
