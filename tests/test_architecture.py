"""The layout of docs/architecture.md, checked on the import graph (read with ``ast``, lazy imports included).

1. no import cycle between files, nor between packages;
2. the shared layers import nothing from ``tag2mask.methods`` or ``tag2mask.cli``;
3. a CLI command module never imports another command module;
4. every method name the CLI accepts is in ``tag2mask.methods.registry`` (and the registry's lists agree
   with the method folders);
6. no function over 80 lines and no file over 500 lines in ``tag2mask/`` unless a comment in the first
   lines of the file says why (a ``# size:`` comment);
7. no private name (``_x``) is imported from another tag2mask module: what two modules share is public.
"""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tag2mask"

#: the layers every method builds on (docs/architecture.md, "Layers")
SHARED = ("clip", "vocab", "data", "io", "jobs", "localization", "refinement", "evaluation", "proposals", "models",
          "synth", "runs", "engine", "segmenter", "inference", "cmdline", "tiny_clip", "runtime", "config", "version",
          "bench", "export")
MAX_FUNCTION_LINES, MAX_FILE_LINES = 80, 500
SIZE_NOTE = "# size:"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The tag2mask module an imported dotted name lives in (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every tag2mask module ``module`` imports, at the top or inside functions (TYPE_CHECKING too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # ``from pkg import mod`` names the module; ``from pkg import attr`` the package (its __init__)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            if name.startswith("tag2mask"):
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or ``None``."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def _collapse(unit_of) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        graph.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets)
    return {k: v - {k} for k, v in graph.items()}


def _top_unit(module: str) -> str:
    """``tag2mask.methods.weclip.model`` -> ``tag2mask.methods``; ``tag2mask.runtime`` stays itself."""
    return ".".join(module.split(".")[:2])


def _package_unit(module: str) -> str:
    """The package a file belongs to (a package's ``__init__``: the package); modules directly in
    ``tag2mask/`` (``runtime``, ``__main__``) are units of their own."""
    if MODULES[module].name == "__init__.py" or module.count(".") == 1:
        return module
    return module.rpartition(".")[0]


def test_no_import_cycle_between_files():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH) or [])


@pytest.mark.parametrize("unit_of", [_top_unit, _package_unit], ids=["top-level packages", "every package"])
def test_no_import_cycle_between_packages(unit_of):
    graph = _collapse(unit_of)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_shared_layers_import_no_method_and_no_cli():
    bad = [f"{m} imports {t}" for m, targets in GRAPH.items() if m.split(".")[1:2] and m.split(".")[1] in SHARED
           for t in targets if t.split(".")[:2] in (["tag2mask", "methods"], ["tag2mask", "cli"])]
    assert not bad, "\n".join(bad)
    assert all(f"tag2mask.{layer}" in MODULES for layer in SHARED), "a shared layer listed here does not exist"


def _command_modules() -> set[str]:
    from tag2mask.cli.main import COMMANDS
    from tag2mask.cli.train_cmd import GENERIC
    from tag2mask.methods import registry

    modules = set(COMMANDS.values()) | set(GENERIC.values())
    modules |= {c.module for m in registry.METHODS for c in m.commands}
    modules |= {m.recipe_setup for m in registry.METHODS if m.recipe_setup}
    return modules


def test_command_modules_never_import_each_other():
    commands = _command_modules()
    assert commands <= set(MODULES), sorted(commands - set(MODULES))
    bad = [f"{m} imports {t}" for m in sorted(commands) for t in sorted(GRAPH[m]) if t in commands]
    assert not bad, "\n".join(bad)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _choices(parser: argparse.ArgumentParser, option: str) -> tuple[str, ...]:
    for action in parser._actions:
        if option in action.option_strings:
            return tuple(action.choices or ())
    raise AssertionError(f"{parser.prog} has no {option}")


def test_every_method_name_the_cli_accepts_is_in_the_registry():
    from tag2mask.cli.demo_cmd import DEFAULT_METHODS
    from tag2mask.cli.main import build_parser
    from tag2mask.cli.train_cmd import GENERIC
    from tag2mask.methods import registry

    known = {n for m in registry.METHODS for n in (m.name, *m.demo_names)}
    commands = _subparsers(build_parser())
    segment = _choices(commands["segment"], "--method")
    label = _choices(commands["label"], "--method")
    train = set(_subparsers(commands["train"])) - set(GENERIC)
    demo = tuple(DEFAULT_METHODS)
    serve = registry.serve_methods()  # each server offers those of them its model runs (SegmentService.methods)
    recipes = _choices(_subparsers(commands["train"])["segmenter"], "--preset")
    for where, names in (("segment --method", segment), ("label --method", label), ("train", train),
                         ("serve", serve), ("demo --methods", demo)):
        assert names and set(names) <= known, f"{where}: {sorted(set(names) - known)} not in the registry"
    assert set(segment) == set(registry.segment_methods()) and set(label) == set(registry.label_methods())
    assert train == {c.name for _, c in registry.commands("train")}
    assert set(recipes) == set(registry.segmenter_recipe_names())
    convert = set(_subparsers(commands["convert"])) - {"checkpoint"}
    assert convert == {c.name for _, c in registry.commands("convert")}
    top = {c.name for _, c in registry.commands("")}
    assert top <= set(commands)


def test_registry_agrees_with_the_method_folders():
    from tag2mask.methods import registry

    for m in registry.METHODS:
        folder = importlib.import_module(m.folder)
        assert folder.__doc__ and "Paper -> files" in folder.__doc__, f"{m.folder}: no paper -> files map"
        for command in m.commands:
            module = importlib.import_module(command.module)
            hooks = {"label": ("add_label_options", "check_label_options", "run_label"),
                     "segment": registry.SEGMENT_HOOKS}.get(command.parent, ("add_parser",))
            assert all(callable(getattr(module, h, None)) for h in hooks), f"{command.module}: {hooks}"
        for ref in (m.predictor, m.demo, m.miou_rule, m.preset_settings, m.supports):
            if ref is not None:
                assert registry.load(ref) is not None
        if m.inputs is not None:
            module = importlib.import_module(m.inputs)
            assert all(callable(getattr(module, h, None)) for h in registry.INPUT_HOOKS), f"{m.inputs}: hooks"
            assert m.needs, f"{m.name}: inputs without needs (the reason shown when they are not given)"
        if m.recipes is not None:
            table = registry.load(m.recipes)
            assert all(registry.segmenter_recipe(r) is not None for r in m.segmenter_recipes)
            assert set(table) <= set(m.segmenter_recipes), f"{m.name}: recipes {set(table)} not registered"
        if m.recipe_setup is not None:
            setup = importlib.import_module(m.recipe_setup)
            assert callable(setup.add_recipe_options) and callable(setup.prepare_run) and setup.RECIPE_OPTIONS
    # preset names listed without imports match the methods' own tables
    from tag2mask.methods.clip_es.pipeline import PRESETS as CLIP_ES
    from tag2mask.methods.clip_zss.cli import PRESET_NAMES as CLIP_ZSS
    from tag2mask.methods.fma.config import PRESETS as FMA
    from tag2mask.methods.maskclip_plus.recipe import SETTING_NAMES
    from tag2mask.methods.ovss.presets import PRESET_NAMES as OVSS
    from tag2mask.methods.tagclip.presets import PRESET_NAMES as TAGCLIP
    from tag2mask.methods.weclip.model import PRESET_NAMES as WECLIP

    own = {"clip-es": tuple(CLIP_ES), "fma": tuple(FMA), "weclip": WECLIP, "clip-zss": CLIP_ZSS,
           "maskclip+": SETTING_NAMES, "tagclip": TAGCLIP, **{n: OVSS for n in registry.segment_methods()}}
    assert {m.name: m.presets for m in registry.METHODS} == own
    for task, ref in registry.RUN_PREDICTORS.items():
        assert callable(registry.load(ref).from_run), task


def test_registry_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys; import tag2mask.methods.registry; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _size_problems() -> list[str]:
    problems = []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        noted = any(line.lstrip().startswith(SIZE_NOTE) for line in lines[:30])
        if len(lines) > MAX_FILE_LINES and not noted:
            problems.append(f"{path.relative_to(PACKAGE.parent)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not noted:
                    problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {length} lines")
    return problems


def test_no_long_functions_or_files():
    problems = _size_problems()
    assert not problems, "\n".join(problems)


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tag2mask"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and f"{node.module}.{alias.name}" not in MODULES:  # a private module is fine
                        offenders.append(f"{module}: from {node.module} import {alias.name}")
    assert not offenders, "private names shared between modules (make them public where they live):\n" + "\n".join(offenders)
