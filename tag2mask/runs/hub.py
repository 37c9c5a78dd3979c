"""Hub-style run folders: ``model.safetensors`` + ``config.json`` + a generated model card ``README.md``.

Such a folder can be pushed to a model hub as it is, and ``segment --checkpoint`` / ``export`` read it like a
run folder (:func:`tag2mask.runs.layout.read_run_checkpoint`). ``model.safetensors`` holds every module of
the run's newest checkpoint as ``<module>.<parameter>`` tensors (no pickle); ``config.json`` holds the run's
task, config, options and meta (``format`` :data:`HUB_FORMAT`). Optimiser state and RNG states are left out:
the folder predicts, it does not resume training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from tag2mask.jobs.checkpoint import HUB_FORMAT, is_hub_folder

__all__ = ["HUB_FORMAT", "is_hub_folder", "write_hub_folder", "read_hub_checkpoint", "run_classes", "model_card"]

_WEIGHTS, _CONFIG, _CARD = "model.safetensors", "config.json", "README.md"


def _flatten(modules: dict[str, Any]) -> dict[str, Any]:
    """``{module: state}`` -> ``{"module.key": contiguous tensor}`` (clones: safetensors refuses shared storage)."""
    flat = {}
    for name, state in modules.items():
        if "." in name:
            raise ValueError(f"module name {name!r} holds a dot; cannot be stored flat")
        for key, value in state.items():
            flat[f"{name}.{key}"] = value.detach().cpu().contiguous().clone()
    return flat


def _eval_report(run: Path) -> Optional[dict[str, Any]]:
    """The end-of-run ``eval.json`` of a run folder (``eval/eval.json`` or ``eval.json``), if any."""
    from tag2mask.io.json_files import loads_named

    for path in (run / "eval" / "eval.json", run / "eval.json"):
        if path.is_file():
            return loads_named(path.read_text(encoding="utf-8"), str(path))
    return None


def run_classes(ckpt: dict[str, Any]) -> list[str]:
    """The class names a run records: its label names (``meta.class_names``), else its config's classes (a
    WeCLIP run: the foreground classes, label 0 being background)."""
    config = ckpt["config"]
    seg = config.get("segmenter", config)
    return [str(c) for c in (ckpt["meta"].get("class_names") or seg.get("classes") or config.get("classes") or [])]


def model_card(ckpt: dict[str, Any], report: Optional[dict[str, Any]]) -> str:
    """The model card (Markdown): method, data, classes, metrics of ``eval.json``, the command that made it."""
    config, meta, options = ckpt["config"], ckpt["meta"], ckpt["options"]
    seg = config.get("segmenter", config)  # a CLIP-ZSS run nests its segmenter config
    classes = run_classes(ckpt)
    lines = ["---", "library_name: tag2mask", "tags: [semantic-segmentation, tag2mask]", "---", "",
             f"# tag2mask run: {ckpt['task']}", "",
             f"- method (engine task): `{ckpt['task']}`; network: `{seg.get('model', meta.get('network', {}).get('name', 'see config.json'))}`",
             f"- trained for {ckpt.get('iteration', '?')} iterations; checkpoint format `{ckpt.get('format')}`",
             f"- data: `{config.get('data') or seg.get('data') or options.get('data') or 'not recorded in the run'}`",
             f"- classes as the run records them ({len(classes)}): {', '.join(map(str, classes))}", ""]
    lines += ["## Metrics", ""]
    if report and isinstance(report.get("scores"), dict):
        scores = report["scores"]
        lines += [f"From the run's `eval.json` ({report.get('num_images', '?')} images, {report.get('data', '')}):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in scores.items() if isinstance(v, (int, float))]
    else:
        lines += ["No `eval.json` in the run folder (trained without an end-of-run evaluation)."]
    command = options.get("resume_command") or "not recorded"
    lines += ["", "## How it was made", "", "The training command as the run recorded it (to resume it):", "",
              f"    {command}", "", "## Use", "",
              "    tag2mask segment IMAGES --checkpoint THIS_FOLDER --out OUT",
              "    tag2mask export THIS_FOLDER --onnx model.onnx", "",
              "Weights: `model.safetensors` (no pickle). Settings: `config.json`.", ""]
    return "\n".join(lines)


def write_hub_folder(ckpt: dict[str, Any], out: Path, run_dir: Optional[Path] = None, overwrite: bool = False) -> Path:
    """Write the hub-style folder of a run checkpoint ``ckpt`` (as
    :func:`tag2mask.runs.layout.read_run_checkpoint` returns it) to ``out``; returns ``out``. ``run_dir``: the
    run folder whose ``eval.json`` the model card quotes.

    Each file is written atomically; an existing ``out`` holding any of the three files needs ``overwrite``.
    """
    from safetensors.torch import save_file

    from tag2mask.io.atomic import atomic_path, atomic_write_text

    existing = [n for n in (_WEIGHTS, _CONFIG, _CARD) if (out / n).exists()]
    if existing and not overwrite:
        raise ValueError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    config = {"format": HUB_FORMAT, "task": ckpt["task"], "iteration": ckpt.get("iteration"),
              "checkpoint_format": ckpt.get("format"), "config": ckpt["config"], "options": ckpt["options"],
              "meta": ckpt["meta"], "modules": sorted(ckpt["modules"])}
    with atomic_path(out / _WEIGHTS) as tmp:
        save_file(_flatten(ckpt["modules"]), str(tmp), metadata={"format": HUB_FORMAT, "task": ckpt["task"]})
    atomic_write_text(out / _CONFIG, json.dumps(config, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / _CARD, model_card(ckpt, _eval_report(run_dir) if run_dir is not None else None))
    return out


def read_hub_checkpoint(folder: Union[str, Path]) -> dict[str, Any]:
    """A hub-style folder as the dict :func:`tag2mask.runs.layout.read_run_checkpoint` returns (JSON parsed)."""
    from safetensors.torch import load_file

    from tag2mask.io.json_files import loads_named

    folder = Path(folder)
    if folder.name == _WEIGHTS:
        folder = folder.parent
    config = loads_named((folder / _CONFIG).read_text(encoding="utf-8"), str(folder / _CONFIG))
    if not isinstance(config, dict) or config.get("format") != HUB_FORMAT:
        raise ValueError(f"{folder / _CONFIG}: not a tag2mask hub-style config (format {HUB_FORMAT})")
    flat = load_file(str(folder / _WEIGHTS), device="cpu")
    modules: dict[str, dict[str, Any]] = {name: {} for name in config.get("modules", [])}
    for key, value in flat.items():
        name, _, param = key.partition(".")
        if name not in modules:
            raise ValueError(f"{folder / _WEIGHTS}: tensor {key!r} of no module listed in {_CONFIG}")
        modules[name][param] = value
    return {"format": config.get("checkpoint_format"), "task": config["task"], "iteration": config.get("iteration"),
            "modules": modules, "config": config["config"], "options": config["options"], "meta": config["meta"],
            "path": str(folder / _WEIGHTS)}
