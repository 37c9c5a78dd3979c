"""An FMA-WSSS prompt run as files: its recipe, the learned context (``prompts.safetensors`` or the newest
checkpoint) and the :class:`~tag2mask.methods.fma.model.FMAClip` they build.

Written by the training task (:mod:`.train_task`), read by ``tag2mask label --method fma`` (:mod:`.label_cli`):
inference reads a run without importing the trainer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from tag2mask.config import DictConfig
from tag2mask.methods.fma.config import StageSettings, preset
from tag2mask.methods.fma.model import FMAClip
from tag2mask.runs.layout import read_run_checkpoint

__all__ = ["TASK_NAME", "PROMPTS_FILE", "FMATrainConfig", "build_model", "save_prompts", "load_prompts"]

#: the engine task of a prompt-training run (its checkpoints are read back under this name)
TASK_NAME = "fma"
#: exported at the end of a run: the learned context and the recipe
PROMPTS_FILE = "prompts.safetensors"


@dataclass
class FMATrainConfig(DictConfig):
    """The recipe of one prompt-training run (stored in every checkpoint and in ``prompts.safetensors``).

    class_names: foreground names of the labels (label id = index); prompt_names: the text of each
    foreground prompt; background: background words (named prompts) or, with
    ``named_background=False``, one nameless prompt per word. ``stage``: the preset's settings
    (prompts, CAA and seeding for inference, schedule, augmentation), with overrides applied.
    """

    preset: str
    task: str
    class_names: tuple[str, ...]
    prompt_names: tuple[str, ...]
    background: tuple[str, ...]
    stage: StageSettings

    @property
    def num_fg(self) -> int:
        return len(self.class_names)

    @property
    def prompt_texts(self) -> list[str]:
        """The G prompt names: foreground, then background (empty strings when nameless)."""
        bg = list(self.background) if self.stage.prompts.named_background else [""] * len(self.background)
        return list(self.prompt_names) + bg


    @classmethod
    def build(cls, preset_name: str, task: str, class_names: Sequence[str], prompt_names: Sequence[str],
              background: Sequence[str], **overrides: Any) -> "FMATrainConfig":
        """A preset stage with ``overrides`` (``None`` values ignored; ``augment_*`` keys set augmentation fields)."""
        stage = preset(preset_name, task)
        aug = {k[len("augment_"):]: v for k, v in overrides.items() if k.startswith("augment_") and v is not None}
        rest = {k: v for k, v in overrides.items() if not k.startswith("augment_") and v is not None}
        if aug:
            rest["augment"] = replace(stage.augment, **aug)
        if len(class_names) != len(prompt_names):
            raise ValueError(f"{len(class_names)} class names but {len(prompt_names)} prompt names")
        return cls(preset=preset_name, task=task, class_names=tuple(class_names), prompt_names=tuple(prompt_names),
                   background=tuple(background), stage=replace(stage, **rest))


def build_model(config: FMATrainConfig, clip, ctx: Optional[torch.Tensor] = None) -> FMAClip:
    """:class:`FMAClip` of ``config`` on ``clip`` (context from ``ctx`` or drawn by the preset's seed)."""
    from tag2mask.clip.numerics import NUMERICS
    from tag2mask.methods.fma.prompts import PromptLearner

    p = config.stage.prompts
    learner = PromptLearner(clip, config.prompt_texts, n_ctx=p.n_ctx, class_specific=p.class_specific,
                            name_position=p.name_position, ctx_std=p.ctx_std, seed=p.seed)
    if ctx is not None:
        if tuple(ctx.shape) != tuple(learner.ctx.shape):
            raise ValueError(f"the learned context has shape {tuple(ctx.shape)}, the prompts need "
                             f"{tuple(learner.ctx.shape)} (another CLIP or prompt setting?)")
        with torch.no_grad():
            learner.ctx.copy_(ctx)
    device = next(clip.parameters()).device
    attention_layers = config.stage.caa.attention_layers if config.stage.caa is not None else 8
    return FMAClip(clip, learner.to(device), n_fg=config.num_fg, attention_layers=attention_layers,
                   numerics=NUMERICS[config.stage.numerics])


def save_prompts(path: Path, ctx: torch.Tensor, config: FMATrainConfig, meta: dict[str, Any],
                 iteration: int) -> Path:
    """Write the learned context and its recipe to a safetensors file (atomic, umask honoured)."""
    from safetensors.torch import save as st_save

    from tag2mask.io.atomic import atomic_write_bytes

    metadata = {"format": "tag2mask-fma-prompts-1", "config": json.dumps(config.to_dict()),
                "meta": json.dumps(meta), "iteration": str(int(iteration))}
    atomic_write_bytes(path, st_save({"ctx": ctx.detach().float().cpu().contiguous()}, metadata=metadata))
    return path


def load_prompts(source: str | Path) -> tuple[FMATrainConfig, torch.Tensor, dict[str, Any]]:
    """The learned context of a run: ``(config, ctx, meta)`` from ``RUN/prompts.safetensors``, a
    prompts file, or (a run stopped before its end) the run's newest checkpoint (``weights_only``)."""
    path = Path(source)
    file = path / PROMPTS_FILE if path.is_dir() else path
    if file.suffix == ".safetensors" or (path.is_dir() and file.is_file()):
        if not file.is_file():
            raise FileNotFoundError(f"prompts file not found: {file}")
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata() or {}
                ctx = f.get_tensor("ctx")
        except Exception as exc:  # not safetensors, truncated, no ctx tensor
            raise ValueError(f"{file}: not a tag2mask FMA prompts file ({type(exc).__name__}: {exc})") from None
        if metadata.get("format") != "tag2mask-fma-prompts-1":
            raise ValueError(f"{file}: not a tag2mask FMA prompts file (metadata format {metadata.get('format')!r})")
        from tag2mask.io.json_files import loads_named

        where = f"{file} (prompt metadata)"
        config = loads_named(metadata.get("config", "null"), where)
        if not isinstance(config, dict):
            raise ValueError(f"{where}: no training configuration")
        return FMATrainConfig.from_dict(config), ctx, loads_named(metadata.get("meta", "{}"), where)
    if not path.exists():
        raise FileNotFoundError(f"--prompts {path}: no such run folder or prompts file")
    ckpt = read_run_checkpoint(path, task=TASK_NAME)
    return FMATrainConfig.from_dict(ckpt["config"]), ckpt["modules"]["prompts"]["ctx"], ckpt.get("meta") or {}
