"""Every sub-command has --help, and user mistakes end in one clear line with exit code 2."""

from __future__ import annotations

import pytest

from tag2mask.cli.main import COMMANDS, main

NESTED = {"train": ["weclip"], "synth": ["export"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    for argv in [[command]] + [[command, sub] for sub in NESTED.get(command, [])]:
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--help"])
        assert exc.value.code == 0
        assert "usage: tag2mask " + " ".join(argv) in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, capsys):
    rc = main(["info", "--weights", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing.pt" in err and "Traceback" not in err


def test_info_reports_the_stored_dtype(capsys):
    from tag2mask.cmdline.options import shipped_weights_path

    assert main(["info", "--weights", str(shipped_weights_path())]) == 0
    out = capsys.readouterr().out
    assert "stored dtype: float16" in out and "format:       safetensors" in out


def test_help_names_what_classes_and_the_web_api_take(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "synth|voc|coco" in text and "FILE" in text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--form-string" in capsys.readouterr().out


def test_docs_name_no_file_outside_the_repository():
    """README and docs/ point only at files of the repository (no shared/specs links)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"(?:\.\./|`)shared/", text), page.name
