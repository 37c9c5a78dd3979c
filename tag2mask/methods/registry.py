"""Every method tag2mask offers, in one table: the CLI's method lists and dispatch come from here.

A method is its folder (``tag2mask/methods/<paper>/``) plus one :class:`Method` entry in
:data:`METHODS`. The entry names its kind, its presets, the factories the generic commands call
(``segment``, ``label``, ``serve``, ``demo``, ``eval``, ``segment --checkpoint``), the sub-commands it
brings (``train weclip``, ``label --method fma``, ``prompts``, ...) and its segmenter recipes
(``train segmenter --preset NAME``). See docs/architecture.md, "Adding a method".

This module is plain data and imports nothing heavy: ``tag2mask --help`` reads it without torch.
Code is referenced as ``"module:attribute"`` strings and imported only when used (:func:`load`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

__all__ = [
    "KINDS", "SEGMENT_HOOKS", "Command", "Method", "METHODS", "RUN_PREDICTORS", "RUN_EXPORTERS", "load", "get", "names", "commands",
    "method_of_command", "segment_methods", "bench_methods", "label_methods", "serve_methods", "demo_methods",
    "INPUT_HOOKS", "add_input_options", "check_input_options", "method_inputs", "unavailable_reason", "offered",
    "segmenter_recipe_names",
    "segmenter_recipe", "segmenter_recipe_owner", "segmenter_preset", "run_predictor", "run_exporter", "miou_rule_of",
    "zero_shot_split",
]

#: what a method turns into masks: image-level tags -> CAMs / pseudo-masks, free-form class names -> masks
#: (training-free), or a trained run (a checkpoint that predicts from the image alone)
KINDS = ("tags->cams", "names->masks", "trained-run")


@dataclass(frozen=True)
class Command:
    """A CLI sub-command a method brings.

    ``parent``: ``""`` for a top-level command (``tag2mask NAME``), else the command it extends:
    ``"train"`` / ``"convert"`` (a sub-command ``tag2mask PARENT NAME``), ``"label"`` (a value of
    ``label --method``) or ``"segment"`` (a ``segment --method`` with its own options and segmenter).
    ``module`` exposes ``add_parser(subparsers) -> ArgumentParser`` (sub-commands), the ``label`` hooks
    ``add_label_options / check_label_options / run_label`` (see :mod:`tag2mask.cli.label_cmd`) or the
    ``segment`` hooks (:data:`SEGMENT_HOOKS`, see :mod:`tag2mask.cli.segment_methods`).
    """

    parent: str
    name: str
    module: str
    help: str = ""


@dataclass(frozen=True)
class Method:
    """One method. ``name`` is how the CLI spells it; ``folder`` the package holding the paper.

    ``demo_names``: the names ``tag2mask demo`` accepts for it (CLIP-ES: also ``gradcam``,
    ``clip-es+pamr``, ``clip-es+crf``); ``presets``: its named settings; ``predictor``: ``"module:factory"`` of a training-free predictor (``names->masks``:
    ``factory(model, vocab, method, **settings)``); ``demo``: ``"module:factory"`` called as
    ``factory(model, vocab, names, options)`` returning ``{name: predict(image, tag_ids) -> (H, W) uint8}``
    (``options["inputs"]``: what :func:`method_inputs` built, by method name); ``run_tasks``: the engine task
    names of its runs, predicted by :data:`RUN_PREDICTORS`; ``segmenter_recipes``: the names it
    registers for ``train segmenter --preset`` and ``recipes``: ``"module:DICT"`` holding them;
    ``recipe_setup``: ``"module"`` with ``add_recipe_options(parser)`` / ``prepare_run(args, kind)`` when
    a recipe needs more than a config (MaskCLIP+'s teacher); ``miou_rule``: ``"module:attr"`` of the
    mIoU rule ``eval`` applies to its outputs; ``serve``: its place in the web demo's list (1 = the default; 0 = not offered).

    ``needs`` (``names->masks``): the inputs its predictor factory requires beyond the model, the name set
    and a preset, e.g. ``("dino", "regions")``; ``tag2mask bench`` cannot give them, so it reports such a
    method as skipped with this list (``tests/test_bench_methods.py`` checks that every required
    parameter of the factory is listed here). ``preset_settings``: ``"module:function"`` called as
    ``function(method, preset) -> dict`` with every setting a preset name (``published:voc21``, ...)
    resolves to, without building anything (``tag2mask bench`` records it in each cell's settings guard).
    ``supports``: ``"module:function"`` called as ``function(model)``: why the loaded CLIP cannot run the
    method (e.g. too few blocks), or ``None`` when it can (``bench`` skips the method with that reason;
    ``serve`` and ``demo`` do not offer it and say why). ``inputs``: ``"module"`` with the hooks of
    :data:`INPUT_HOOKS` through which ``serve`` and ``demo`` take what ``needs`` lists (their own options,
    checked before the model loads, then turned into the predictor factory's keyword arguments); without
    them the method is listed as unavailable, the reason built from ``needs``.
    """

    name: str
    kind: str
    folder: str
    paper: str
    demo_names: tuple[str, ...] = ()
    presets: tuple[str, ...] = ()
    predictor: Optional[str] = None
    demo: Optional[str] = None
    run_tasks: tuple[str, ...] = ()
    commands: tuple[Command, ...] = ()
    segmenter_recipes: tuple[str, ...] = ()
    recipes: Optional[str] = None
    recipe_setup: Optional[str] = None
    miou_rule: Optional[str] = None
    serve: int = 0
    needs: tuple[str, ...] = ()
    preset_settings: Optional[str] = None
    supports: Optional[str] = None
    inputs: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


#: what a ``Command("segment", ...)`` module defines (see :mod:`tag2mask.cli.segment_methods`)
SEGMENT_HOOKS = ("add_segment_options", "check_segment_options", "segment_preset", "segment_vocabulary",
                 "build_segmenter", "segment_settings", "segment_warnings")

#: what a method's ``inputs`` module defines: ``add_app_options(parser)`` (its options of ``serve`` and
#: ``demo``), ``check_app_options(args, command)`` (cheap checks before the model loads; ``ValueError``)
#: and ``app_inputs(args, model) -> dict | None`` (the predictor factory's and demo hook's extra keyword
#: arguments, built once: weights loaded; ``None`` when the options do not configure the method)
INPUT_HOOKS = ("add_app_options", "check_app_options", "app_inputs")

_OVSS = "tag2mask.methods.ovss"
_OVSS_PRESETS = ("default", "published")
_OVSS_PREDICTOR = "tag2mask.methods.ovss.segmenter:OpenVocabSegmenter"
_OVSS_DEMO = "tag2mask.methods.ovss.demo:demo_predictors"
_OVSS_SETTINGS = "tag2mask.methods.ovss.presets:preset_settings"
_OVSS2_SETTINGS = "tag2mask.methods.ovss2.presets:preset_settings"


def _ovss(name: str, paper: str, serve: int) -> Method:
    return Method(name, "names->masks", _OVSS, paper, presets=_OVSS_PRESETS, predictor=_OVSS_PREDICTOR,
                  demo=_OVSS_DEMO, demo_names=(name,), serve=serve, preset_settings=_OVSS_SETTINGS)


#: the methods, in the order the CLI lists them
METHODS: tuple[Method, ...] = (
    Method("clip-es", "tags->cams", "tag2mask.methods.clip_es", "CLIP-ES (Lin et al., CVPR 2023)",
           demo_names=("gradcam", "clip-es", "clip-es+pamr", "clip-es+crf"), presets=("voc", "coco", "synth"),
           demo="tag2mask.methods.clip_es.demo:demo_predictors",
           commands=(Command("label", "clip-es", "tag2mask.methods.clip_es.label_cli", "training-free, default"),
                     Command("", "prompts", "tag2mask.methods.clip_es.prompts_cli")),
           segmenter_recipes=("clip-es",), recipes="tag2mask.methods.clip_es.recipe:SEGMENTER_RECIPES"),
    Method("fma", "tags->cams", "tag2mask.methods.fma", "FMA-WSSS (Yang & Gong, WACV 2024)",
           presets=("voc", "coco", "synth"),
           commands=(Command("train", "fma", "tag2mask.methods.fma.cli"),
                     Command("label", "fma", "tag2mask.methods.fma.label_cli",
                             "FMA-WSSS: learned prompts of --prompts RUN + seeding")),
           segmenter_recipes=("fma", "fma:coco"), recipes="tag2mask.methods.fma.recipe:SEGMENTER_RECIPES"),
    _ovss("maskclip", "MaskCLIP (Zhou, Loy & Dai, ECCV 2022)", 4),
    _ovss("sclip", "SCLIP (Wang, Mei & Yuille, ECCV 2024)", 2),
    _ovss("clearclip", "ClearCLIP (Lan et al., ECCV 2024)", 3),
    _ovss("naclip", "NACLIP (Hajimiri, Ben Ayed & Dolz, WACV 2025)", 1),
    Method("scclip", "names->masks", "tag2mask.methods.ovss2", "SC-CLIP (IEEE TIP 2025)",
           presets=_OVSS_PRESETS, predictor="tag2mask.methods.ovss2.segmenter:NewerOvssSegmenter",
           preset_settings=_OVSS2_SETTINGS, supports="tag2mask.methods.ovss2.scclip:unsupported_reason",
           demo="tag2mask.methods.ovss2.demo:demo_predictors", demo_names=("scclip",), serve=6,
           commands=(Command("segment", "scclip", "tag2mask.methods.ovss2.segment_cli"),)),
    Method("pearl", "names->masks", "tag2mask.methods.ovss2", "PEARL (CVPR 2026)",
           presets=_OVSS_PRESETS, predictor="tag2mask.methods.ovss2.segmenter:NewerOvssSegmenter",
           preset_settings=_OVSS2_SETTINGS,
           demo="tag2mask.methods.ovss2.demo:demo_predictors", demo_names=("pearl",), serve=5,
           commands=(Command("segment", "pearl", "tag2mask.methods.ovss2.segment_cli"),)),
    Method("corrclip", "names->masks", "tag2mask.methods.corrclip", "CorrCLIP (ICCV 2025)",
           presets=_OVSS_PRESETS, predictor="tag2mask.methods.corrclip.segmenter:corrclip_predictor",
           preset_settings=_OVSS2_SETTINGS, needs=("a DINO ViT (--dino)", "region masks (--regions)"),
           inputs="tag2mask.methods.corrclip.app", demo="tag2mask.methods.corrclip.app:demo_predictors",
           demo_names=("corrclip",), serve=7,
           commands=(Command("segment", "corrclip", "tag2mask.methods.corrclip.segment_cli"),)),
    Method("maskclip+", "trained-run", "tag2mask.methods.maskclip_plus", "MaskCLIP+ (Zhou, Loy & Dai, ECCV 2022)",
           presets=("annotation-free", "voc20", "context59", "coco-stuff", "voc20-zs", "voc21-zs", "coco-stuff-zs",
                    "context60-zs"),
           segmenter_recipes=("maskclip+", "maskclip+:voc20", "maskclip+:context59", "maskclip+:coco-stuff",
                              "maskclip+:voc20-zs", "maskclip+:voc21-zs", "maskclip+:coco-stuff-zs",
                              "maskclip+:context60-zs"),
           recipes="tag2mask.methods.maskclip_plus.recipe:SEGMENTER_RECIPES",
           recipe_setup="tag2mask.methods.maskclip_plus.cli"),
    Method("weclip", "trained-run", "tag2mask.methods.weclip", "WeCLIP (Zhang et al., CVPR 2024)",
           presets=("voc", "coco", "synth"), demo="tag2mask.methods.weclip.demo:demo_predictors", demo_names=("weclip",),
           run_tasks=("weclip",),
           commands=(Command("train", "weclip", "tag2mask.methods.weclip.cli"),
                     Command("convert", "weclip", "tag2mask.methods.weclip.convert_cli")),
           segmenter_recipes=("weclip-fs",), recipes="tag2mask.methods.weclip.recipe:SEGMENTER_RECIPES",
           miou_rule="tag2mask.methods.weclip.model:WeCLIPConfig.miou_rule"),
    Method("tagclip", "tags->cams", "tag2mask.methods.tagclip", "TagCLIP (Lin et al., AAAI 2024)",
           presets=("voc", "coco", "cocostuff", "synth"),
           commands=(Command("", "tag", "tag2mask.methods.tagclip.cli"),
                     Command("label", "tagclip", "tag2mask.methods.tagclip.label_cli",
                             "TagCLIP: an image folder's tags predicted, no --labels, then CLIP-ES"))),
    Method("clip-zss", "trained-run", "tag2mask.methods.clip_zss", "CLIP-ZSS (Chen et al., 2024)",
           presets=("voc", "coco-stuff", "context", "synth"), run_tasks=("clip-zss",),
           commands=(Command("train", "clip-zss", "tag2mask.methods.clip_zss.cli"),)),
)

#: engine task name of a run folder -> ``"module:Class"`` of its predictor, called as
#: ``Class.from_run(checkpoint, device=..., weights=..., crf=..., classes=...)``; ``segmenter`` runs are the
#: generic :mod:`tag2mask.segmenter` (any recipe), the others belong to the method listing the task
RUN_PREDICTORS: dict[str, str] = {
    "segmenter": "tag2mask.segmenter.predictor:TrainedSegmenter",
    "weclip": "tag2mask.methods.weclip.inference:WeCLIPSegmenter",
    "clip-zss": "tag2mask.methods.clip_zss.inference:ZeroShotStudent",
}

#: engine task name of a run folder -> ``"module:function"`` of its export hook (``tag2mask export``), called as
#: ``function(checkpoint, weights=..., classes=...)`` -> :class:`tag2mask.export.onnx_graph.ExportSpec`
RUN_EXPORTERS: dict[str, str] = {
    "segmenter": "tag2mask.segmenter.export:export_spec",
    "weclip": "tag2mask.methods.weclip.export:export_spec",
    "clip-zss": "tag2mask.methods.clip_zss.export:export_spec",
}


def load(ref: str) -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute (``"package.module"``: the module)."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def get(name: str) -> Method:
    """The method called ``name`` (or one of its demo names); ``KeyError`` naming the valid ones."""
    for m in METHODS:
        if name == m.name or name in m.demo_names:
            return m
    raise KeyError(f"unknown method {name!r}; choose one of {', '.join(names())}")


def names(kind: Optional[str] = None) -> tuple[str, ...]:
    """Method names, optionally of one kind."""
    return tuple(m.name for m in METHODS if kind is None or m.kind == kind)


def commands(parent: str) -> tuple[tuple[Method, Command], ...]:
    """``(method, command)`` for every command the methods bring under ``parent`` (``""``: top level)."""
    return tuple((m, c) for m in METHODS for c in m.commands if c.parent == parent)


def method_of_command(parent: str, name: str) -> Command:
    """The command ``name`` under ``parent``; ``KeyError`` naming the valid ones."""
    found = {c.name: c for _, c in commands(parent)}
    if name not in found:
        raise KeyError(f"unknown {parent or 'command'} {name!r}; choose one of {', '.join(found)}")
    return found[name]


def segment_methods() -> tuple[str, ...]:
    """``segment --method`` choices: the training-free name -> mask methods."""
    return names("names->masks")


def bench_methods() -> tuple[str, ...]:
    """``bench --methods all``: every training-free name -> mask method (those with ``needs`` are reported
    as skipped by the bench, not left out)."""
    return names("names->masks")


def label_methods() -> tuple[str, ...]:
    """``label --method`` choices: every method bringing a ``label`` hook (CLIP-ES, the default, first)."""
    return tuple(c.name for _, c in commands("label"))


def serve_methods() -> tuple[str, ...]:
    """The methods of the web demo (``tag2mask serve``), the default first."""
    return tuple(m.name for m in sorted((m for m in METHODS if m.serve), key=lambda m: m.serve))


def demo_methods() -> tuple[str, ...]:
    """Every name ``tag2mask demo --methods`` accepts, in registry order: the training-free methods (a
    trained run's demo predictor needs its checkpoint, given through :func:`tag2mask.cli.demo_scenes.evaluate_methods`)."""
    return tuple(n for m in METHODS if m.demo is not None and m.kind != "trained-run" for n in m.demo_names)


def _input_modules() -> tuple[str, ...]:
    return tuple(dict.fromkeys(m.inputs for m in METHODS if m.inputs))


def add_input_options(parser: Any) -> None:
    """Add every method's ``serve`` / ``demo`` options (:data:`INPUT_HOOKS`) to ``parser``."""
    for module in _input_modules():
        load(module).add_app_options(parser)


def check_input_options(args: Any, command: str) -> None:
    """The methods' cheap checks of their ``serve`` / ``demo`` options (``ValueError``), before any model loads."""
    for module in _input_modules():
        load(module).check_app_options(args, command)


def method_inputs(method_names: Sequence[str], model: Any, args: Any) -> dict[str, dict[str, Any]]:
    """``method -> keyword arguments`` its ``inputs`` module builds from ``args`` (weights loaded once), for each
    method among ``method_names`` (demo names allowed) that has one, runs on ``model`` and is configured."""
    found: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(get(n) for n in method_names):
        if m.inputs and not (m.supports and load(m.supports)(model)):
            built = load(m.inputs).app_inputs(args, model)
            if built is not None:
                found[m.name] = dict(built)
    return found


def unavailable_reason(name: str, model: Any, inputs: Mapping[str, Any]) -> Optional[str]:
    """Why the method ``name`` cannot run with ``model`` and ``inputs`` (:func:`method_inputs`), or ``None``:
    its ``supports`` check, else the ``needs`` that no input provides."""
    m = get(name)
    reason = load(m.supports)(model) if m.supports else None
    if reason is None and m.needs and m.name not in inputs:
        reason = f"it needs {' and '.join(m.needs)}"
    return reason


def offered(method_names: Sequence[str], model: Any, inputs: Mapping[str, Any]
            ) -> tuple[tuple[str, ...], dict[str, str]]:
    """``(the names that can run, {name: why not} for the others)``, in the order of ``method_names``."""
    reasons = {n: unavailable_reason(n, model, inputs) for n in method_names}
    return tuple(n for n, r in reasons.items() if r is None), {n: r for n, r in reasons.items() if r is not None}


def segmenter_recipe_names() -> tuple[str, ...]:
    """Every ``train segmenter --preset`` name, in registry order."""
    return tuple(r for m in METHODS for r in m.segmenter_recipes)


def segmenter_recipe_owner(name: str) -> Method:
    """The method that registers the segmenter recipe ``name``."""
    for m in METHODS:
        if name in m.segmenter_recipes:
            return m
    raise KeyError(f"unknown segmenter preset {name!r}; choose from {sorted(segmenter_recipe_names())}")


def segmenter_recipe(name: str) -> dict[str, Any]:
    """The recipe dict of ``name`` (``maskclip+:SETTING`` -> the ``maskclip+`` base; the method adds the rest)."""
    owner = segmenter_recipe_owner(name)
    table = load(owner.recipes)
    return table[name] if name in table else table[name.split(":", 1)[0]]


def segmenter_preset(name: Optional[str], **overrides: Any):
    """The one preset lookup of ``train segmenter``: a :class:`~tag2mask.segmenter.task.SegmenterConfig`
    from the recipe ``name`` (``None``: the dataclass defaults) with ``overrides`` applied."""
    from tag2mask.segmenter.task import segmenter_config

    if name is not None:
        try:
            recipe = segmenter_recipe(name)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    else:
        recipe = None
    return segmenter_config(recipe, **overrides)


def run_predictor(task: str) -> Any:
    """The predictor class of runs of the engine task ``task`` (``ValueError`` for an unknown task)."""
    if task not in RUN_PREDICTORS:
        raise ValueError(f"a run of task {task!r}: no method segments with it (known: {', '.join(RUN_PREDICTORS)})")
    return load(RUN_PREDICTORS[task])


def run_exporter(task: str) -> Any:
    """The export hook of runs of the engine task ``task`` (``ValueError`` for a task that does not export)."""
    if task not in RUN_EXPORTERS:
        raise ValueError(f"a run of task {task!r} cannot be exported (exportable: {', '.join(RUN_EXPORTERS)})")
    return load(RUN_EXPORTERS[task])


def miou_rule_of(method: str) -> Optional[str]:
    """The mIoU rule recorded by ``method``'s evaluation (``None``: the default rule)."""
    try:
        ref = get(method).miou_rule
    except KeyError:
        return None
    return load(ref) if ref else None


def zero_shot_split(spec: str) -> Any:
    """The named seen / unseen split ``spec`` (``voc-15-5``, ``synth-9-3``, ...) of CLIP-ZSS, or ``None``."""
    return load("tag2mask.vocab.zero_shot_splits:find_split")(spec)
