"""FMA-WSSS prompt learning on the training engine: ``tag2mask train fma --task cls|seg``.

What is trained: the CoOp context vectors of :class:`~tag2mask.methods.fma.prompts.PromptLearner`
(nothing else; the CLIP is frozen). Per iteration (official ``train_coop/run.py``): a batch of
augmented crops (:mod:`tag2mask.methods.fma.data`), optionally split into ``grad_accumulation``
sub-batches whose losses are each divided by that number; :class:`~tag2mask.methods.fma.model.FMAClip`
with ``create_graph`` when the CAM loss is on; the loss is ``w_cl * contrastive + w_fg * CAM-fg +
w_bg * CAM-bg`` (classification stage: the contrastive loss on image-level labels; segmentation
stage: the CAM activation loss against the coarse seeds); SGD with momentum and weight decay on the
context, learning rate flat during the warm-up and cosine after it (:mod:`tag2mask.engine.schedules.cosine`).

Deviations kept explicit (docs/fma.md):

* losses with weight 0 are not computed. The official classification run also evaluates the CAM
  loss (weight 0) against the data set's ground-truth masks; tag2mask reads no masks there;
* a (sub-)batch whose crops hold no positive class (segmentation stage, crops of background only)
  contributes a zero CAM loss. The official code gets 0/0 = NaN there, which its fp16 gradient
  scaler skips (and which stops an fp32 run);
* no periodic validation against ground-truth masks (the official runs chose iterations with it).

The run folder is the engine's (``docs/training.md``): checkpoints hold the context only (a few
hundred kB), the recipe and the CLIP's path and fingerprint; at the end ``prompts.safetensors``
(context + recipe, :mod:`.prompt_run`) is exported for ``tag2mask label --method fma --prompts RUN``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from tag2mask.methods.fma.losses import cam_activation_loss, multilabel_contrastive_loss
from tag2mask.methods.fma.model import FMAClip
from tag2mask.engine.schedules.cosine import warmup_cosine_lr
from tag2mask.engine.loop import RunOptions, TrainContext, TrainTask, train
from tag2mask.methods.fma.data import FMABatch, FMACrops, collate, open_fma_data
from tag2mask.methods.fma.prompt_run import PROMPTS_FILE, TASK_NAME, FMATrainConfig, build_model, save_prompts
from tag2mask.engine.data_stream import position_loader

__all__ = ["FMAData", "FMATask", "train_fma"]

@dataclass
class FMAData:
    """Where the training images come from (see :func:`tag2mask.methods.fma.data.open_fma_data`)."""

    spec: str
    split: str = "train"
    seeds: Optional[str] = None
    labels_file: Optional[str] = None
    synth_n: int = 64
    synth_size: int = 224
    weights: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class _LossForward(nn.Module):
    """FMAClip forward + the stage's losses, so that DDP sees the whole computation."""

    def __init__(self, model: FMAClip, weights: tuple[float, float, float]) -> None:
        super().__init__()
        self.model = model
        self.weights = weights

    def forward(self, images: torch.Tensor, labels: torch.Tensor, seeds: Optional[torch.Tensor]) -> dict[str, Any]:
        w_cl, w_fg, w_bg = self.weights
        cam_on = w_fg != 0 or w_bg != 0
        out = self.model(images, labels, create_graph=cam_on, need_attention=False, require_positive=False,
                         need_cams=cam_on)
        n_fg = self.model.n_fg
        # keeps the graph to the context even when every term below is skipped
        loss = 0 * out.logits.sum()
        values: dict[str, Any] = {"positives": int((labels > 0).sum())}
        if w_cl != 0:
            cl = multilabel_contrastive_loss(out.logits[:, :n_fg].float(), labels)
            loss = loss + w_cl * cl
            values["cl_loss"] = cl.detach()
        if cam_on:
            if seeds is None:
                raise ValueError("the CAM loss needs seed masks (--seeds)")
            fg, bg = _cam_losses(out.pos_cam.float(), out.pos_pairs, seeds)
            loss = loss + w_fg * fg + w_bg * bg
            values.update(cam_fg=fg.detach(), cam_bg=bg.detach())
        values["loss"] = loss
        return values


def _cam_losses(pos_cam: torch.Tensor, pairs: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CAM activation loss, zero (with a graph) when no labelled pixel belongs to a positive pair."""
    if pos_cam.shape[0] == 0:
        zero = pos_cam.sum()
        return zero, zero
    seed = seeds[pairs[:, 0].to(seeds.device)]
    if not bool((seed != 255).any()):
        zero = 0 * pos_cam.sum()
        return zero, zero
    return cam_activation_loss(pos_cam, pairs, seeds)


class FMATask(TrainTask):
    """See the module docstring."""

    name = TASK_NAME
    recipe_type = FMATrainConfig

    def __init__(self, config: FMATrainConfig, data: FMAData) -> None:
        self.config, self.data = config, data
        self.accumulation_steps = config.stage.grad_accumulation
        self.ctx: Optional[TrainContext] = None

    @property
    def max_iters(self) -> int:
        return self.config.stage.max_iters

    def use_recipe(self, recipe: FMATrainConfig) -> None:
        self.config = recipe
        self.accumulation_steps = recipe.stage.grad_accumulation

    def setup(self, ctx: TrainContext) -> None:
        from tag2mask.clip.loading import load_clip
        from tag2mask.clip.numerics import NUMERICS

        self.ctx = ctx
        numerics = NUMERICS[self.config.stage.numerics]
        clip = load_clip(self.data.weights, device=ctx.device, round_fp16_weights=numerics.round_weights_fp16)
        self.clip_ref = {"weights": str(getattr(clip, "source_path", self.data.weights)),
                         "fingerprint": str(getattr(clip, "fingerprint", ""))}
        self.model = build_model(self.config, clip)
        self.forward_loss = ctx.ddp(_LossForward(self.model, self.config.stage.loss_weights))
        d, stage = self.data, self.config.stage
        self.source = open_fma_data(d.spec, d.split, self.config.class_names, seeds=d.seeds, labels_file=d.labels_file,
                                    label_source=stage.label_source, synth_n=d.synth_n, synth_size=d.synth_size)

    def modules(self) -> dict[str, nn.Module]:
        return {"prompts": self.model.prompts}

    def build_optimizer(self) -> torch.optim.Optimizer:
        s = self.config.stage
        return torch.optim.SGD([{"params": [self.model.prompts.ctx], "lr": s.base_lr, "weight_decay": s.weight_decay}],
                               lr=s.base_lr, momentum=s.momentum)

    def lr_multiplier(self, iteration: int) -> float:
        s = self.config.stage
        return warmup_cosine_lr(iteration, base_lr=1.0, max_iters=s.max_iters, warmup_iters=s.warmup_iters,
                                warmup_factor=s.warmup_factor)

    def batches(self, start: int, end: int) -> Iterable[Any]:
        s, ctx = self.config.stage, self.ctx
        crops = FMACrops(self.source, s.augment, self.config.num_fg, ctx.seed, labels_from_crop=s.labels_from_crop)
        loader = position_loader(crops, start, end, s.batch_size, ctx.rank, ctx.world_size, collate_fn=collate,
                                 num_workers=ctx.num_workers, seed=ctx.seed)
        parts = self.accumulation_steps
        for batch in loader:
            yield batch if parts == 1 else batch.split(parts)

    def step(self, batch: FMABatch, iteration: int) -> dict[str, Any]:
        device = self.ctx.device
        seeds = None if batch.seeds is None else batch.seeds.to(device, non_blocking=True)
        with self.ctx.autocast():
            return self.forward_loss(batch.images.to(device, non_blocking=True), batch.labels.to(device), seeds)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"clip": dict(self.clip_ref)} if hasattr(self, "clip_ref") else {}

    def finish(self, summary: dict[str, Any]) -> None:
        if self.ctx.is_main:
            path = save_prompts(self.ctx.out_dir / PROMPTS_FILE, self.model.prompts.ctx.detach(), self.config,
                                self.checkpoint_meta(), iteration=summary["iterations"])
            summary["prompts"] = str(path)




def train_fma(config: FMATrainConfig, data: FMAData, options: RunOptions) -> dict[str, Any]:
    """Train (or resume) prompts; returns the engine's summary (``summary["prompts"]`` at the end)."""
    return train(FMATask(config, data), options)
