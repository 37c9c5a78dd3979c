"""Every numeric option of every sub-command is checked by a typed helper (tag2mask.cmdline.option_types).

The walker introspects the argparse parsers: no option may still use a bare ``int``/``float``, and
NaN, infinity, -1, 0 and 1e30 are refused with exit code 2 and one line naming the option, unless the
helper declares the value valid (0 for options where it means "off"/"keep"; such helpers say so).
"""

from __future__ import annotations

import argparse

import pytest

from tag2mask.cli.main import build_parser, main
from tag2mask.cmdline.option_types import MAX_SIDE, Number, _AutoOr, device, finite_float, positive_int

BAD_VALUES = ("nan", "inf", "-1", "0", "1e30", "abc")


def _walk(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))
        elif action.option_strings and action.type is not None:
            yield path, action


OPTIONS = [(path, a) for path, a in _walk(build_parser())]
NUMERIC = [(path, a) for path, a in OPTIONS if isinstance(a.type, (Number, _AutoOr))]


def test_no_option_uses_a_bare_int_or_float():
    bare = [f"{' '.join(p)} {a.option_strings[-1]}" for p, a in OPTIONS if a.type in (int, float)]
    assert not bare, bare
    assert len(NUMERIC) > 50  # the walk really sees the options


def _expect_refused(capsys, argv: list[str], option: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert option in err, err
    return err


@pytest.mark.parametrize("path,action", NUMERIC, ids=[f"{' '.join(p)} {a.option_strings[-1]}" for p, a in NUMERIC])
def test_every_numeric_option_refuses_bad_values(capsys, path, action):
    option = action.option_strings[-1]
    refused = 0
    for value in BAD_VALUES:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if action.type.accepts(number):
            # declared valid by the helper: it must then be parsed without complaint
            assert action.type(value) == number
            continue
        _expect_refused(capsys, [*path, option, value], option)
        refused += 1
    assert refused >= 4  # nan, inf, 1e30 and abc at least, whatever the range


def test_zero_is_valid_only_where_the_helper_says_what_it_means():
    for path, action in NUMERIC:
        number = action.type.number if isinstance(action.type, _AutoOr) else action.type
        if number.accepts(0) and number.kind is int and number.lo == 0 and action.option_strings[-1] not in (
                "--seed", "--min-size", "--rfm-start", "--self-train-from", "--warmup-iters", "--test", "--val"):
            assert number.note, f"{' '.join(path)} {action.option_strings[-1]}: 0 accepted without a note"


@pytest.mark.parametrize("value", ["mps", "tpu", "", "cuda:x", "CUDA"])
def test_device_is_cpu_cuda_cuda_n_or_auto(capsys, value):
    with_device = [(p, a) for p, a in OPTIONS if a.option_strings[-1] == "--device"]
    assert with_device
    for path, action in with_device:
        assert action.type is device, path
        _expect_refused(capsys, [*path, "--device", value], "--device")
    assert [device(v) for v in ("cpu", "cuda", "cuda:1", "auto")] == ["cpu", "cuda", "cuda:1", "auto"]


def test_absurd_sizes_are_refused_with_the_documented_maximum(capsys, tmp_path):
    err = _expect_refused(capsys, ["segment", str(tmp_path), "--classes", "a, b", "--out", str(tmp_path / "o"),
                                   "--short-side", "100000"], "--short-side")
    assert f"{MAX_SIDE:,}" in err or str(MAX_SIDE) in err
    err = _expect_refused(capsys, ["synth", "export", "--out", str(tmp_path / "s"), "--size", "60000"], "--size")
    assert f"{MAX_SIDE:,}" in err or str(MAX_SIDE) in err


def test_helpers():
    assert positive_int(10)("4e0") == 4 and positive_int(10**12)("12345678901") == 12345678901
    for bad in ("0", "-3", "2.5", "1e30", "nan", "inf", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(10**12)(bad)
    f = finite_float(0, 1)
    assert f("0") == 0.0 and f("1") == 1.0
    for bad in ("nan", "-inf", "1.0001", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            f(bad)


@pytest.mark.parametrize("argv", [["label"], ["segment"], ["eval"], ["seed"], ["prompts"], ["train", "weclip"],
                                  ["train", "segmenter"], ["synth", "export"], ["convert", "weclip"]])
def test_sub_commands_without_arguments_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "required" in err and "Traceback" not in err, err


def test_stop_at_beyond_iters_is_refused(tmp_path):
    from _toy_tasks import ToyTask
    from tag2mask.engine.loop import RunOptions, train

    with pytest.raises(ValueError, match="--stop-at 20 is outside the run's 1..12 iterations"):
        train(ToyTask(iters=12), RunOptions(out_dir=str(tmp_path / "r"), device="cpu", stop_at=20, progress=False))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content,why", [("cat\ncat\n", "duplicate class name"), ("cat\ndo\x00g\n", "control character")])
@pytest.mark.parametrize("command", ["segment", "eval", "train"])
def test_bad_class_files_are_refused_naming_the_file(tmp_path, capsys, content, why, command):
    classes = tmp_path / "classes.txt"
    classes.write_text(content)
    argv = {"segment": ["segment", str(tmp_path), "--out", str(tmp_path / "o")],
            "eval": ["eval", str(tmp_path), "--gt", str(tmp_path)],
            "train": ["train", "weclip", "--data", "synth", "--out", str(tmp_path / "r"), "--device", "cpu"]}[command]
    assert main([*argv, "--classes", str(classes)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(classes) in err and why in err and "\n" not in err, err
