"""Adding a method is its folder plus one registry entry: the commands it brings appear without other edits."""

from __future__ import annotations

import pytest

import _registry_example
from tag2mask.cli.main import main
from tag2mask.methods import registry


@pytest.fixture
def with_example(monkeypatch):
    entry = registry.Method(
        "tagdemo", "tags->cams", "_registry_example", "an example",
        commands=(registry.Command("", "tagdemo", "_registry_example"),
                  registry.Command("train", "tagdemo", "_registry_example")))
    monkeypatch.setattr(registry, "METHODS", registry.METHODS + (entry,))
    _registry_example.CALLS.clear()
    return entry


def test_a_registered_top_level_command_and_train_sub_command_run(with_example, capsys):
    assert main(["tagdemo", "--name", "a"]) == 0
    assert main(["train", "tagdemo", "--name", "b"]) == 0
    assert _registry_example.CALLS == [("tagdemo", "a"), ("train", "b")]
    assert registry.get("tagdemo") is with_example
    # listed in --help like the generic commands
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "tagdemo" in capsys.readouterr().out


def test_without_the_entry_the_command_does_not_exist(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["tagdemo", "--name", "a"])
    assert stop.value.code == 2 and "invalid choice: 'tagdemo'" in capsys.readouterr().err


def test_a_method_command_may_not_take_a_generic_name(monkeypatch):
    clash = registry.Method("clash", "tags->cams", "_registry_example", "a clash",
                            commands=(registry.Command("", "segment", "_registry_example"),))
    monkeypatch.setattr(registry, "METHODS", registry.METHODS + (clash,))
    with pytest.raises(ValueError, match="segment"):
        main(["info"])


def test_unknown_names_say_what_is_known():
    with pytest.raises(KeyError, match="naclip"):
        registry.get("no-such-method")
    with pytest.raises(ValueError, match="clip-es"):
        registry.segmenter_preset("no-such-recipe")
    with pytest.raises(ValueError, match="segmenter"):
        registry.run_predictor("no-such-task")
    with pytest.raises(ValueError, match="kind"):
        registry.Method("x", "pixels->magic", "x", "x")
