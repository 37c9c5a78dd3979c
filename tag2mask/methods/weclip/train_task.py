"""WeCLIP training on the engine: online pseudo labels → balanced CE + 0.1 × affinity loss, poly warm-up AdamW.

:class:`WeCLIPTask` is the recipe (what the official ``dist_clip_voc.py`` trains); everything around it
— exact resume, checkpoints, DDP, AMP, logs, validation scheduling — is
:mod:`tag2mask.engine.loop`. Only the trainable decoder is checkpointed; CLIP is referenced by
path and fingerprint. The learning rate of iteration ``t`` is ``lr · poly_warmup_multiplier(t)``, the
official ``PolyWarmupAdamW`` rule (:mod:`tag2mask.engine.schedules.poly`) driven by the iteration instead of
the optimiser's own step counter (they only differ when an fp16 step is skipped).

Bitwise resume on CPU holds because every random draw is either reproducible from the stream
position (data, see :mod:`tag2mask.methods.weclip.data`) or restored from the checkpoint (dropout).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tag2mask.evaluation.miou import ConfusionMatrix
from tag2mask.methods.weclip.data import WeCLIPTrainSet, collate_train, open_images
from tag2mask.methods.weclip.losses import affinity_loss, balanced_ce_terms, cams_to_affinity_label, radius_window_mask
from tag2mask.methods.weclip.model import WeCLIP, WeCLIPConfig, build_clip_for, normalize_rgb
from tag2mask.engine.loop import RunOptions, TrainContext, TrainTask, train
from tag2mask.runs.layout import read_run_checkpoint
from tag2mask.engine.schedules.poly import PolyWarmupSchedule
from tag2mask.engine.data_stream import position_loader

__all__ = [
    "TrainOptions", "WeCLIPTask", "train_weclip", "train_step", "weclip_losses", "training_loss", "validate",
    "config_with_overrides", "load_training_checkpoint",
]


@dataclass
class TrainOptions:
    """How to run a WeCLIP training job (the model/recipe itself is a :class:`WeCLIPConfig`).

    data / train_split / val_split / labels_file: see :func:`~tag2mask.methods.weclip.data.open_images`
    (``val_split=None`` disables validation). ``resume``: ``"auto"`` (the newest complete checkpoint
    of ``out_dir``), a checkpoint file or run folder, or ``None``. ``overwrite``: start again in an
    existing run folder. ``stop_at``: leave after this many iterations (the schedule still targets
    ``config.max_iters``). ``tensorboard``: auto | on | off.
    """

    out_dir: str
    weights: str
    data: str = "synth"
    train_split: str = "train"
    val_split: Optional[str] = "val"
    labels_file: Optional[str] = None
    synth_n: int = 64
    synth_size: int = 160
    val_limit: Optional[int] = None
    ckpt_every: int = 1000
    val_every: int = 2000
    log_every: int = 10
    resume: Optional[str] = None
    overwrite: bool = False
    stop_at: Optional[int] = None
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 1
    num_workers: int = 0
    tensorboard: str = "auto"
    progress: bool = True
    keep_last: Optional[int] = None
    text_cache_dir: Any = None
    resume_command: str = ""


# ------------------------------------------------------------------------------------------------
# loss and step


def training_loss(
    seg_logits: torch.Tensor, affinity: torch.Tensor, label: torch.Tensor, config: WeCLIPConfig
) -> dict[str, torch.Tensor]:
    """Balanced CE + ``aff_loss_weight`` × affinity loss (float32).

    seg_logits ``(B, C, h, w)``, affinity ``(B, hw, hw)``, label ``(B, H, W)`` int64.
    Deviation kept explicit: the official balanced CE is NaN when a batch has no background (or no
    foreground) pixel; here the empty term is dropped instead, so one such batch cannot poison training.
    """
    logits = F.interpolate(seg_logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    ce_bg, ce_fg = balanced_ce_terms(logits, label)
    zero = logits.new_zeros(())
    seg = 0.5 * (torch.where(torch.isnan(ce_bg), zero, ce_bg) + torch.where(torch.isnan(ce_fg), zero, ce_fg))
    h, w = label.shape[-2] // 16, label.shape[-1] // 16
    mask = radius_window_mask(h, w, config.aff_radius, device=label.device)
    aff, _, _ = affinity_loss(affinity.float(), cams_to_affinity_label(label, mask=mask))
    return {"loss": seg + config.aff_loss_weight * aff, "seg_loss": seg, "aff_loss": aff}


def weclip_losses(model: WeCLIP, decoder: torch.nn.Module, images: torch.Tensor, label_ids: list[list[int]],
                  use_rfm: bool, amp_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Forward, online pseudo labels (no grad) and loss of one WeCLIP iteration (no backward).

    images ``(B, 3, S, S)`` normalised crops on the model's device; ``decoder`` is ``model.decoder``
    or its DDP wrapper.
    """
    ctx = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with ctx:
        out = model(images, decoder=decoder)
    labels = model.online_pseudo_labels(images, label_ids, use_rfm=use_rfm, output=out, autocast_dtype=amp_dtype)
    return training_loss(out.seg_logits, out.affinity, labels, model.config)


def train_step(model: WeCLIP, decoder: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: torch.Tensor, label_ids: list[list[int]], use_rfm: bool,
               amp_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """One complete iteration outside the engine (benchmarks): :func:`weclip_losses`, backward, step."""
    losses = weclip_losses(model, decoder, images, label_ids, use_rfm, amp_dtype)
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.step(opt)
    scaler.update()
    return losses


@torch.no_grad()
def validate(model: WeCLIP, source: Any, limit: Optional[int], ctx: TrainContext) -> dict[str, Any]:
    """Single-scale mIoU of ``model`` (eval mode) on ``source`` images with GT masks, sharded over ranks."""
    from tag2mask.methods.weclip.inference import multiscale_logits

    was_training = model.training
    model.eval()
    device = next(model.decoder.parameters()).device
    cm = ConfusionMatrix(model.config.num_classes)
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(ctx.rank, n, ctx.world_size):
        gt = source.gt(i)
        if gt is None:
            continue
        _, rgb, _ = source.item(i)
        x = normalize_rgb(rgb, model.config.normalization)[None].to(device)
        with ctx.autocast():
            logits = multiscale_logits(model, x, scales=(1.0,), flip=False)
        pred = F.interpolate(logits.float(), size=gt.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        cm.update(pred.cpu().numpy().astype(np.uint8), gt.astype(np.uint8))
    cm.mat = ctx.all_reduce_sum(torch.from_numpy(cm.mat)).numpy()
    model.train(was_training)
    s = cm.scores(model.config.miou_rule)  # WeCLIP's own rule: classes present in the ground truth
    return {"miou": s["Mean IoU"], "pixel_acc": s["Pixel Accuracy"], "miou_rule": model.config.miou_rule}


# ------------------------------------------------------------------------------------------------
# the task


class WeCLIPTask(TrainTask):
    """WeCLIP's decoder trained on its online pseudo labels (see the module docstring)."""

    name = "weclip"
    recipe_type = WeCLIPConfig

    def __init__(self, config: WeCLIPConfig, opts: TrainOptions) -> None:
        self.config, self.opts = config, opts
        self.ctx: Optional[TrainContext] = None

    @property
    def max_iters(self) -> int:
        return self.config.max_iters


    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        clip = build_clip_for(self.config, self.opts.weights, ctx.device)
        self.model = WeCLIP(clip, self.config, text_cache_dir=self.opts.text_cache_dir).to(ctx.device)
        self.decoder = ctx.ddp(self.model.decoder)
        self.clip_ref = {"weights": str(getattr(clip, "source_path", self.opts.weights)),
                         "fingerprint": getattr(clip, "fingerprint", "")}
        o = self.opts
        data = dict(labels_file=o.labels_file, synth_n=o.synth_n, synth_size=o.synth_size)
        if hasattr(self.config, "label_source"):  # image labels from the GT masks (released code) or the data set
            data["label_source"] = self.config.label_source
        self.source = open_images(o.data, o.train_split, self.config.classes, **data)
        self.val_source = None
        if o.val_split and o.val_every > 0:
            self.val_source = open_images(o.data, o.val_split, self.config.classes, **data)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"decoder": self.model.decoder}

    def build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.decoder.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": params}], lr=c.lr, weight_decay=c.weight_decay, betas=tuple(c.betas),
                                 eps=1e-8)

    def lr_multiplier(self, iteration: int) -> float:
        c = self.config
        return PolyWarmupSchedule(max_iters=c.max_iters, warmup_iters=c.warmup_iters, warmup_ratio=c.warmup_ratio,
                                  power=c.power).multiplier(iteration)

    def batches(self, start: int, end: int) -> Iterable[Any]:
        c, ctx = self.config, self.ctx
        train_set = WeCLIPTrainSet(self.source, c.crop_size, scale_range=c.scale_range, hflip=c.hflip,
                                   normalization=c.normalization, seed=ctx.seed)
        return position_loader(train_set, start, end, c.batch_size, ctx.rank, ctx.world_size,
                               collate_fn=collate_train, num_workers=ctx.num_workers, seed=ctx.seed)

    def step(self, batch: Any, iteration: int) -> dict[str, Any]:
        images = batch.images.to(self.ctx.device, non_blocking=True)
        use_rfm = self.model.use_rfm_at(iteration)
        losses = weclip_losses(self.model, self.decoder, images, batch.label_ids, use_rfm, self.ctx.amp_dtype)
        return {**losses, "rfm": int(use_rfm)}

    def validate(self, iteration: int) -> Optional[dict[str, float]]:
        if self.val_source is None:
            return None
        return validate(self.model, self.val_source, self.opts.val_limit, self.ctx)

    def checkpoint_meta(self) -> dict[str, Any]:
        o = self.opts  # what was trained on, so a run folder says it (config.json, checkpoints)
        meta: dict[str, Any] = {"data": {"data": str(o.data), "train_split": o.train_split,
                                         "val_split": o.val_split, "labels": o.labels_file}}
        if hasattr(self, "clip_ref"):
            meta["clip"] = dict(self.clip_ref)
        return meta


def train_weclip(config: WeCLIPConfig, opts: TrainOptions) -> dict[str, Any]:
    """Train (or resume) a WeCLIP decoder; returns the engine's summary (last losses, val scores, paths)."""
    run = RunOptions(
        out_dir=opts.out_dir, resume=opts.resume, overwrite=opts.overwrite, device=opts.device,
        precision=opts.precision, seed=opts.seed, stop_at=opts.stop_at, ckpt_every=opts.ckpt_every,
        val_every=opts.val_every if opts.val_split else 0, log_every=opts.log_every, keep_last=opts.keep_last,
        num_workers=opts.num_workers, progress=opts.progress, tensorboard=opts.tensorboard,
        resume_command=opts.resume_command,
    )
    return train(WeCLIPTask(config, opts), run)


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a WeCLIP checkpoint (file or run folder; ``weights_only=True``) with its JSON fields parsed."""
    return read_run_checkpoint(path, task="weclip")


def config_with_overrides(config: WeCLIPConfig, **overrides: Any) -> WeCLIPConfig:
    """``replace`` ignoring ``None`` values (CLI options that were not given)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
