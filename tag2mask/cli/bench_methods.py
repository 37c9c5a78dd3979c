"""The methods of ``tag2mask bench``, read from the method registry (the bench harness knows none).

Every ``names->masks`` method of :mod:`tag2mask.methods.registry` is benched: a method added to the
registry joins ``bench --methods all`` with no edit here. On each benchmark it runs its registered
predictor factory (``factory(model, vocab, method, preset=NAME)``) with its ``published:<config>``
preset (``--preset published``, the default) or its ``default`` preset. A method whose factory needs
inputs the bench cannot give (the registry's ``needs``, e.g. CorrCLIP's DINO and regions) or that has no
such preset is planned as skipped, with the reason, and reported so in the results.
"""

from __future__ import annotations

from typing import Any, Optional

from tag2mask.bench.harness import MethodPlan
from tag2mask.methods import registry

__all__ = ["select_methods", "preset_for", "RegistryMethods"]


def select_methods(spec: str) -> list[str]:
    """``all`` -> every method :func:`~tag2mask.methods.registry.bench_methods` lists; else ``m1,m2`` checked."""
    known = list(registry.bench_methods())
    if spec.strip().lower() == "all":
        return known
    chosen = [m.strip().lower() for m in spec.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose 'all' or from {', '.join(known)}")
    return list(dict.fromkeys(chosen))


def preset_for(preset: str, config: str) -> str:
    """``published`` -> ``published:<config>`` (the official config of that benchmark); others as given."""
    return f"published:{config}" if preset == "published" else preset


class RegistryMethods:
    """The bench's :class:`~tag2mask.bench.runner.MethodSource`: plans and builds methods through the registry.

    ``preset`` is ``bench --preset`` (``published`` or ``default``). :meth:`plan` needs no model (the
    cells are planned, and bad names fail, before the model is loaded); set :attr:`model` before
    :meth:`build`. Each predictor gets the model as loaded and applies its own preset to it (e.g. the
    fp16 weight rounding of the published presets, on a copy).
    """

    def __init__(self, preset: str, model: Any = None) -> None:
        self.preset = preset
        self.model = model

    @property
    def fingerprint(self) -> Optional[str]:
        return getattr(self.model, "fingerprint", None)

    def plan(self, method: str, config: str) -> MethodPlan:
        """How ``method`` runs on the benchmark of official config ``config``: its preset and settings, or
        why it is skipped."""
        entry = registry.get(method)
        if entry.kind != "names->masks" or entry.predictor is None:
            return MethodPlan(method, None, skip=f"a {entry.kind} method has no training-free predictor to bench")
        if entry.needs:
            return MethodPlan(method, None, skip=f"its predictor needs {' and '.join(entry.needs)}, which the bench "
                                                 "does not provide (run it with tag2mask segment)")
        if self.preset not in entry.presets:
            return MethodPlan(method, None, skip=f"it has no {self.preset!r} preset "
                                                 f"(its presets: {', '.join(entry.presets) or 'none'})")
        name = preset_for(self.preset, config)
        settings = registry.load(entry.preset_settings)(method, name) if entry.preset_settings else None
        return MethodPlan(method, name, settings)

    def unsupported(self, plan: MethodPlan) -> Optional[str]:
        """The registry's ``supports`` check of ``plan.method`` on :attr:`model` (``None``: it can run)."""
        check = registry.get(plan.method).supports
        return registry.load(check)(self.model) if check and self.model is not None else None

    def build(self, plan: MethodPlan, vocab: Any) -> Any:
        """The registered predictor of ``plan.method`` with ``plan.preset`` on :attr:`model`."""
        if plan.skip is not None or plan.preset is None:
            raise ValueError(f"{plan.method} is not benched: {plan.skip}")
        if self.model is None:
            raise ValueError("RegistryMethods.build: no model loaded yet")
        factory = registry.load(registry.get(plan.method).predictor)
        return factory(self.model, vocab, plan.method, preset=plan.preset)
