"""One consistent CLI: plain-text help whose shown defaults are the parser's, and options that do not
apply are errors (exit code 2, one line naming the option), never silently ignored."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest

from tag2mask.cli.main import build_parser, main

REST_MARKUP = re.compile(r"``|:(func|mod|class|meth|attr|data|obj|ref):`|::\s*$", re.M)
SHOWN_DEFAULT = re.compile(r"\(default:?\s+([^);]*)")


def _subparsers(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from _subparsers(sub, path + (name,))


SUBPARSERS = dict(_subparsers(build_parser()))


def test_every_command_is_audited():
    assert {p[0] for p in SUBPARSERS} >= {"demo", "info", "label", "segment", "eval", "synth", "train", "serve"}


@pytest.mark.parametrize("path", sorted(SUBPARSERS), ids=" ".join)
def test_help_is_plain_text(path):
    text = SUBPARSERS[path].format_help()
    bad = [m.group(0) for m in REST_MARKUP.finditer(text)]
    assert not bad, f"tag2mask {' '.join(path)} --help has reST markup: {bad}"


def _same(shown: str, value) -> bool:
    try:
        return float(shown) == float(value)
    except (TypeError, ValueError):
        return shown == str(value)


@pytest.mark.parametrize("path", sorted(SUBPARSERS), ids=" ".join)
def test_shown_defaults_are_the_parser_defaults(path):
    parser = SUBPARSERS[path]
    checked = 0
    for action in parser._actions:
        if not action.help or not action.option_strings:
            continue
        text = parser._get_formatter()._expand_help(action)
        for match in SHOWN_DEFAULT.finditer(text):
            shown = re.sub(r"(?<=\d),(?=\d{3})", "", match.group(1)).strip()  # 1,000,000 -> 1000000
            name = f"tag2mask {' '.join(path)} {action.option_strings[-1]}"
            if action.default is None:
                # resolved at run time (a preset, the method): the help must say so, not show a number
                assert not re.match(r"[-\d.]", shown), f"{name}: shows {shown!r} but the parser default is None"
            elif isinstance(action.default, (list, tuple)):
                words = [w for w in re.split(r"[\s,]+", shown) if w][: len(action.default)]
                assert len(words) == len(action.default) and all(map(_same, words, action.default)), \
                    f"{name}: shows {shown!r}, the parser default is {action.default!r}"
            else:
                first = re.split(r"[\s,]", shown)[0].rstrip(":")
                assert _same(first, action.default), f"{name}: shows {first!r}, the parser default is {action.default!r}"
            checked += 1
    assert checked or path in {("synth",), ("train",), ("info",), ("convert",), ("convert", "checkpoint")}


def _error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"{argv}: exit code {rc}, stderr {err!r}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra, option", [
    (["--classes", "cat, dog"], "--classes"),
    (["--method", "naclip"], "--method"),  # the default value, typed: still a mistake
    (["--crop", "224"], "--crop"),
    (["--pamr"], "--pamr"),
    (["--templates", "photo"], "--templates"),
    (["--prob-threshold", "0.1"], "--prob-threshold"),
])
def test_segment_checkpoint_rejects_open_vocabulary_options(tmp_path, capsys, extra, option):
    err = _error(capsys, ["segment", str(tmp_path), "--checkpoint", str(tmp_path / "run"), "--out",
                          str(tmp_path / "o"), *extra])
    assert f"{option} does not apply with --checkpoint" in err


def test_segment_option_errors(tmp_path, capsys):
    base = ["segment", str(tmp_path), "--classes", "cat, dog", "--out", str(tmp_path / "o")]
    assert "--crf does not apply without --checkpoint" in _error(capsys, base + ["--crf"])
    assert "--crop, --stride do not apply with --mode whole" in _error(
        capsys, base + ["--mode", "whole", "--crop", "300", "--stride", "100"])
    assert "--allow-download does not apply without --weights" in _error(capsys, base + ["--allow-download"])


def test_label_option_errors(tmp_path, capsys):
    base = ["label", str(tmp_path), "--out", str(tmp_path / "o")]
    assert "--confidence does not apply with --refine pamr" in _error(capsys, base + ["--confidence", "0.9"])
    assert "--confidence does not apply with --refine none" in _error(
        capsys, base + ["--refine", "none", "--confidence", "0.9"])
    assert "--bg-power does not apply with --refine crf" in _error(capsys, base + ["--refine", "crf", "--bg-power", "2"])
    assert "--split does not apply with --labels" in _error(
        capsys, base + ["--labels", str(tmp_path / "t.json"), "--split", "val"])


def test_eval_option_errors(tmp_path, capsys):
    base = ["eval", str(tmp_path), "--gt", str(tmp_path)]
    assert "--bg-powers does not apply without --cams" in _error(capsys, base + ["--bg-powers", "1"])
    assert "--thresholds does not apply without --cams" in _error(capsys, base + ["--thresholds", "0.5"])
    assert "--html does not apply with --cams" in _error(capsys, base + ["--cams", "--html", str(tmp_path / "h")])
    assert "--images does not apply without --html" in _error(capsys, base + ["--images", str(tmp_path)])
    assert "--bg-powers does not apply with --thresholds" in _error(
        capsys, base + ["--cams", "--thresholds", "0.5", "--bg-powers", "2"])


def test_info_and_demo_option_errors(tmp_path, capsys):
    assert "--allow-download does not apply without --weights" in _error(capsys, ["info", "--allow-download"])
    assert "--allow-download does not apply without --weights" in _error(
        capsys, ["demo", "--out", str(tmp_path / "d"), "--n", "1", "--methods", "sclip", "--allow-download"])
    assert "--allow-download does not apply without --weights" in _error(capsys, ["serve", "--allow-download"])
    assert "--allow-download does not apply without --weights" in _error(
        capsys, ["train", "weclip", "--data", "synth", "--out", str(tmp_path / "r"), "--allow-download"])


def test_segment_runs_the_shown_window(tmp_path, monkeypatch):
    """The crop / stride / short side shown by --help are what the segmenter uses."""
    from PIL import Image

    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "seg"
    assert main(["segment", str(tmp_path / "x.png"), "--classes", "star, ring", "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    window = json.loads((out / "run.json").read_text())["window"]
    # the window options default to the preset's values; --help shows them in its preset table
    from tag2mask.methods.ovss.presets import get_preset

    preset = get_preset("naclip", "default")
    assert window == {"mode": preset.mode, "short_side": preset.short_side, "crop": preset.crop,
                      "stride": preset.stride}
    table_row = f"{preset.short_side}         {preset.mode} {preset.crop}/{preset.stride}"
    assert table_row in SUBPARSERS[("segment",)].format_help()


def test_segment_checkpoint_records_the_runs_test_size(tmp_path, capsys):
    """--checkpoint runs at the trained run's long side (not a fixed 512) and says so in run.json."""
    from PIL import Image

    run = tmp_path / "run"
    assert main(["train", "weclip", "--data", "synth", "--out", str(run), "--iters", "1", "--batch-size", "1",
                 "--crop", "64", "--val-split", "none", "--device", "cpu", "--no-compat", "--quiet",
                 "--synth-n", "2", "--synth-size", "64"]) == 0
    config = json.loads((run / "config.json").read_text())
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "seg"
    capsys.readouterr()
    assert main(["segment", str(tmp_path / "x.png"), "--checkpoint", str(run), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["long_side"] == _find(config, "test_long_side") != 512
    assert record["scales"] == list(_find(config, "test_scales"))
    # trained on the shipped tiny CLIP, used on an image that is not synthetic: the note, once
    assert capsys.readouterr().err.count("warning: the tiny CLIP") == 1 and record["warnings"]


def _find(tree, key):
    """``key``'s value anywhere in a nested JSON object (the run's config layout is not this test's business)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def test_train_weclip_option_errors(tmp_path, capsys):
    base = ["train", "weclip", "--out", str(tmp_path / "run")]
    assert "--labels does not apply to a synth data set" in _error(
        capsys, base + ["--data", "synth", "--labels", str(tmp_path / "t.json")])
    assert "--val-limit does not apply without a validation split" in _error(
        capsys, base + ["--data", "synth", "--val-split", "none", "--val-limit", "3"])
    voc = tmp_path / "voc"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    assert "--synth-n, --synth-size do not apply without --data synth" in _error(
        capsys, base + ["--data", str(voc), "--synth-n", "3", "--synth-size", "64"])
    assert not (tmp_path / "run").exists()
