"""``tag2mask --help`` stays fast: building the parser and printing any command's help imports none of the
heavy libraries (torch, NumPy, Pillow, SciPy, transformers, OpenCV). Checked in a fresh interpreter,
since this test process has them loaded already; behavioural, not timed (benchmarks/cli_startup.py
times it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "PIL", "scipy", "transformers", "cv2", "pydensecrf", "skimage")

_PROBE = r"""
import argparse, contextlib, io, json, sys
HEAVY = %r

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))

from tag2mask.cli.main import build_parser, main
parser = build_parser()
result = {"after_build": loaded(), "helps": {}}

def commands(p, prefix=()):
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from commands(sub, prefix + (name,))

for argv in [()] + list(commands(parser)):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([*argv, "--help"])
            code = None
        except SystemExit as exc:
            code = exc.code
    result["helps"][" ".join(argv)] = {"code": code, "chars": len(out.getvalue()), "loaded": loaded()}
print(json.dumps(result))
"""


def test_help_imports_no_heavy_library():
    done = subprocess.run([sys.executable, "-c", _PROBE % (HEAVY,)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["after_build"] == []
    helps = result["helps"]
    # every command and sub-command was reached: label, segment, eval ... and e.g. 'train weclip'
    assert {"", "label", "segment", "eval", "train", "train weclip"} <= set(helps), sorted(helps)
    for argv, res in helps.items():
        assert res["code"] == 0 and res["chars"] > 200, (argv, res)
        assert res["loaded"] == [], f"'tag2mask {argv} --help' imported {res['loaded']}"


def test_torch_not_imported_by_building_the_parser_in_process():
    """The brief's own check, as a user's script would do it: import, build, look at sys.modules."""
    code = ("import sys; from tag2mask.cli.main import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
