"""The bench takes its methods from the registry: every ``names->masks`` method, built through its
registered predictor factory with its published preset per benchmark; a method that needs inputs the
bench cannot give is reported as skipped with the reason, not a crash."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from tag2mask.bench.datasets import BENCHMARK_NAMES, get_spec
from tag2mask.bench.synthetic import write_synthetic_layout
from tag2mask.cli.bench_methods import RegistryMethods, preset_for, select_methods
from tag2mask.cli.main import main
from tag2mask.methods import registry

BENCHED = registry.bench_methods()


def test_bench_methods_are_the_registry_names_to_masks_methods():
    assert BENCHED and set(BENCHED) == {m.name for m in registry.METHODS if m.kind == "names->masks"}
    assert select_methods("all") == list(BENCHED)
    assert select_methods(f" {BENCHED[-1]} ,{BENCHED[0]},{BENCHED[-1]}") == [BENCHED[-1], BENCHED[0]]
    for bad in ("nope", "", f"{BENCHED[0]},nope"):
        with pytest.raises(ValueError, match="--methods"):
            select_methods(bad)


@pytest.mark.parametrize("name", BENCHED)
def test_every_required_factory_input_is_declared_in_needs(name):
    """The bench calls ``factory(model, vocab, method, preset=NAME)``: anything else a factory requires
    must be in the entry's ``needs`` (so the bench skips it with a reason instead of crashing)."""
    entry = registry.get(name)
    params = inspect.signature(registry.load(entry.predictor)).parameters.values()
    required = {p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    assert required - {"model", "vocab", "method"} <= set(entry.needs), f"{name}: declare them in Method.needs"
    takes_preset = any(p.name == "preset" or p.kind == p.VAR_KEYWORD for p in params)
    assert takes_preset or entry.needs, f"{name}: its factory takes no preset"


@pytest.mark.parametrize("name", [n for n in BENCHED if not registry.get(n).needs])
def test_published_preset_of_every_benchmark_resolves_before_building(name):
    source = RegistryMethods("published")
    for bench in BENCHMARK_NAMES:
        config = get_spec(bench).config
        plan = source.plan(name, config)
        assert plan.skip is None and plan.preset == preset_for("published", config) == f"published:{config}"
        if registry.get(name).preset_settings:
            assert isinstance(plan.settings, dict) and plan.settings
            json.dumps(plan.settings)  # recorded in the settings guard and results.json
    default = source.__class__("default").plan(name, get_spec(BENCHMARK_NAMES[0]).config)
    assert default.preset == "default"


def _with_extra_methods(monkeypatch) -> tuple[str, str]:
    """Register two names->masks methods the bench must skip: one needing a DINO and regions, one
    without a published preset. Their factory does not exist, so building either would fail loudly."""
    absent = "tag2mask.methods.absent_for_test:Predictor"
    needy = registry.Method("needs-dino", "names->masks", "tag2mask.methods.absent_for_test", "test only",
                            presets=("default", "published"), predictor=absent, needs=("a DINO", "regions"))
    plain = dataclasses.replace(needy, name="no-published", presets=("default",), needs=())
    monkeypatch.setattr(registry, "METHODS", registry.METHODS + (needy, plain))
    return needy.name, plain.name


def test_plans_of_methods_the_bench_cannot_run_say_why(monkeypatch):
    needy, plain = _with_extra_methods(monkeypatch)
    source = RegistryMethods("published")
    plan = source.plan(needy, "voc21")
    assert plan.preset is None and "a DINO and regions" in plan.skip
    assert "no 'published' preset" in source.plan(plain, "voc21").skip
    with pytest.raises(ValueError, match="not benched"):
        source.build(plan, vocab=None)
    trained = next(m.name for m in registry.METHODS if m.kind == "trained-run")
    assert "trained-run" in source.plan(trained, "voc21").skip


def test_a_method_needing_other_inputs_is_reported_skipped_not_a_crash(tmp_path, monkeypatch):
    needy, plain = _with_extra_methods(monkeypatch)
    monkeypatch.setenv("TAG2MASK_CACHE", str(tmp_path / "cache"))
    names = write_synthetic_layout(tmp_path / "data", "voc20", n=2, size=64)
    runs = BENCHED[0]
    rc = main(["bench", "--data", str(tmp_path / "data"), "--datasets", "voc20", "--methods",
               f"{needy},{runs},{plain}", "--names-voc20", str(names), "--out", str(tmp_path / "o"), "--quiet",
               "--device", "cpu"])
    assert rc == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    cells = {c["method"]: c for c in results["cells"]}
    assert cells[runs]["status"] == "ran" and cells[runs]["images"] == 2 and 0.0 <= cells[runs]["miou"] <= 1.0
    for name, reason in ((needy, "a DINO and regions"), (plain, "no 'published' preset")):
        c = cells[name]
        assert c["status"] == "skipped" and reason in c["skip_reason"] and c["miou"] is None and c["images"] == 0
        assert results["table"][name]["voc20"] is None
        assert not (tmp_path / "o" / c["cell"]).exists()  # nothing written for a skipped cell
    md = (tmp_path / "o" / "results.md").read_text()
    assert f"skipped: {needy} on " in md and "a DINO and regions" in md
    assert results["miou_rule"] == cells[runs]["miou_rule"]
    csv_text = (tmp_path / "o" / "results.csv").read_text()
    assert csv_text.splitlines()[0].startswith("dataset,method,status,skip_reason") and "skipped" in csv_text
