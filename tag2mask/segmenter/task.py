"""Training a segmentation network on label maps (pseudo-labels or ground truth) on the training engine.

:class:`SegmenterTask` trains any network with the :mod:`tag2mask.models` interface
(``forward(images) -> (B, C, h, w)``, ``training_loss(images, target) -> {"loss": ...}``,
``normalization``; optionally ``parameter_groups()``, ``predict()``, ``frozen_prefixes()``,
``export_config()``) on a :class:`~tag2mask.data.segmentation.SegmentationSource`, with the
augmentation of :mod:`tag2mask.data.seg_augment`, SGD or AdamW and a poly schedule (optionally
stepped every N iterations, with warm-up and a floor). The network is built by a factory, so the
task does not depend on which network is trained.

Hooks for teacher-student recipes (MaskCLIP+, CLIP-ZSS): label values listed in
``unlabeled_classes`` become *unlabelled* (-1) in the training crops (every pixel but the padding
and the masks' 255 when the source says ``all_unlabeled``: images without masks); a ``teacher``
callable fills those pixels of the same augmented crop (``teacher(images, target, iteration) ->
target``), and from the iteration ``self_train_from`` on the network's own predictions (argmax over
the unlabelled classes, from a forward pass in training mode that leaves the BatchNorm running
statistics untouched) fill them instead. Pixels still unlabelled, the masks' 255 and the crop
padding are ignored. The phase is a function of the iteration, so it survives a resume; a teacher's
own state goes into the checkpoint through its ``state_dict``/``load_state_dict`` if it has them.
A ``teacher_factory(config, ctx, network)`` builds the teacher in ``setup`` from the recipe actually run
(after a resume: the stored one, including its ``teacher`` settings).

``reduce_zero_label`` (mmseg's name) reads masks in the VOC layout (0 = background) for a network
without a background class: mask value 0 is ignored and every class value drops by one, in the
training crops and in the scored ground truth.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from tag2mask.config import DictConfig
from tag2mask.data.seg_augment import SegAugment
from tag2mask.data.segmentation import IGNORE, SegmentationSource
from tag2mask.segmenter.label_values import reduce_zero_label
from tag2mask.engine.loop import TrainContext, TrainTask
from tag2mask.engine.schedules.poly import poly_warmup_multiplier
from tag2mask.engine.data_stream import EpochOrder, position_loader

__all__ = ["SegmenterConfig", "segmenter_config", "SegmenterTask", "SegmentationCrops",
           "UNLABELED", "build_network", "fill_unlabeled"]

#: target value of pixels a teacher (or self-training) may label
UNLABELED = -1

ModelFactory = Callable[["SegmenterConfig"], nn.Module]
Teacher = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
TeacherFactory = Callable[["SegmenterConfig", TrainContext, nn.Module], Teacher]


@dataclass
class SegmenterConfig(DictConfig):
    """The recipe of a segmenter run (stored in every checkpoint; the published recipes are the methods'
    ``SEGMENTER_RECIPES``, looked up by :func:`tag2mask.methods.registry.segmenter_preset`).

    Classes: ``classes`` are the foreground names; with ``background`` label 0 is background and
    ``num_classes = len(classes) + 1`` (VOC layout), else ``num_classes = len(classes)``.
    Schedule: ``lr_g(t) = base_g · poly(t)`` with ``poly`` = WeCLIP's warm-up + poly rule
    (:func:`~tag2mask.engine.schedules.poly.poly_warmup_multiplier`) evaluated at ``lr_step ·
    floor(t / lr_step)`` (deeplab-pytorch steps every 10 iterations) and floored at ``min_lr`` (mmseg).
    Groups (networks with ``parameter_groups()``): backbone at ``lr``, head weights ×
    ``head_lr_mult``, head biases × ``head_bias_lr_mult`` (weight decay off unless ``head_bias_weight_decay``).
    Several processes: ``sync_bn`` converts BatchNorm to SyncBatchNorm on CUDA; ``ddp_find_unused`` for
    networks whose forward skips parameters.
    """

    model: str = "deeplab-v2"
    model_options: dict = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    background: bool = True
    # data
    crop_size: int = 321
    scales: tuple[float, ...] = ()
    scale_range: tuple[float, float] = (0.5, 2.0)
    reference_size: Optional[tuple[int, int]] = None
    hflip: bool = True
    photometric: bool = False
    reduce_zero_label: bool = False
    unlabeled_classes: tuple[int, ...] = ()
    # optimisation
    batch_size: int = 10
    max_iters: int = 20000
    optimizer: str = "sgd"
    lr: float = 2e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    head_lr_mult: float = 10.0
    head_bias_lr_mult: float = 20.0
    head_bias_weight_decay: bool = False
    poly_power: float = 0.9
    lr_step: int = 10
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    min_lr: float = 0.0
    max_grad_norm: Optional[float] = None
    sync_bn: bool = False
    ddp_find_unused: bool = False
    # teacher -> self-training switch (MaskCLIP+); the teacher's settings, read by the method that builds it
    self_train_from: Optional[int] = None
    teacher: dict = field(default_factory=dict)
    # validation / final evaluation
    test_mode: str = "whole"
    test_crop: int = 512
    test_stride: int = 341
    test_scales: tuple[float, ...] = (1.0,)
    test_flip: bool = False
    test_long_side: Optional[int] = None
    test_reference_size: Optional[tuple[int, int]] = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.test_mode not in ("whole", "slide"):
            raise ValueError(f"test_mode must be 'whole' or 'slide', got {self.test_mode!r}")
        if self.lr_step < 1 or self.max_iters < 1 or self.batch_size < 1 or self.crop_size < 1:
            raise ValueError("lr_step, max_iters, batch_size and crop_size must be positive")
        if self.reduce_zero_label and self.background:
            raise ValueError("reduce_zero_label ignores the masks' background: the network then has no background "
                             "class (background=False)")
        if self.test_long_side and self.test_reference_size:
            raise ValueError("give test_long_side or test_reference_size, not both")
        bad = [c for c in self.unlabeled_classes if not 0 <= int(c) < self.num_classes]
        if bad and self.classes:
            raise ValueError(f"unlabeled_classes {bad} are not label values 0..{self.num_classes - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.classes) + (1 if self.background else 0)

    @property
    def mask_num_classes(self) -> int:
        """Label values the masks may hold besides 255 (one more than the network's with ``reduce_zero_label``)."""
        return self.num_classes + (1 if self.reduce_zero_label else 0)

    @property
    def class_names(self) -> list[str]:
        """Names of the label values ``0 .. num_classes - 1``."""
        return (["background"] if self.background else []) + list(self.classes)

    def augment(self) -> SegAugment:
        return SegAugment(crop=self.crop_size, scales=tuple(self.scales), scale_range=tuple(self.scale_range),
                          reference_size=tuple(self.reference_size) if self.reference_size else None,
                          hflip=self.hflip, photometric=self.photometric)



def segmenter_config(recipe: Optional[dict[str, Any]], **overrides: Any) -> SegmenterConfig:
    """A :class:`SegmenterConfig` from a recipe (``None``: the dataclass defaults) with overrides applied.

    Recipes are the methods' (``SEGMENTER_RECIPES`` of a method folder); look one up by name with
    :func:`tag2mask.methods.registry.segmenter_preset`. ``model_options`` of the recipe and of the
    overrides are merged (the overrides win).
    """
    base: dict[str, Any] = json.loads(json.dumps(recipe)) if recipe is not None else {}
    options = {**base.pop("model_options", {}), **overrides.pop("model_options", {})}
    return SegmenterConfig.from_dict({**base, **overrides, "model_options": options})


def build_network(config: SegmenterConfig, options: Optional[dict[str, Any]] = None) -> nn.Module:
    """The network of ``config`` from :func:`tag2mask.models.build_segmenter` (``options`` replace the model options)."""
    try:
        from tag2mask.models import build_segmenter
    except ImportError as exc:  # pragma: no cover - the models package ships with tag2mask
        raise ImportError(f"tag2mask.models is needed to build {config.model!r} ({exc})") from exc
    return build_segmenter(config.model, config.num_classes, **(config.model_options if options is None else options))


def fill_unlabeled(target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``target`` with its :data:`UNLABELED` pixels taken from ``labels`` (every other pixel unchanged)."""
    return torch.where(target == UNLABELED, labels.to(target.dtype), target)


class SegmentationCrops(torch.utils.data.Dataset):
    """Training crops indexed by stream position: ``crops[pos] -> (image (3, S, S), target (S, S) int64)``."""

    def __init__(self, source: SegmentationSource, augment: SegAugment, normalize: Callable, seed: int,
                 unlabeled_classes: Sequence[int] = (), reduce_zero: bool = False) -> None:
        self.source, self.augment, self.normalize, self.seed = source, augment, normalize, int(seed)
        self.order = EpochOrder(len(source), self.seed)
        self.unlabeled = torch.tensor(sorted(set(int(c) for c in unlabeled_classes)), dtype=torch.int64)
        self.reduce_zero = reduce_zero
        self.all_unlabeled = bool(getattr(source, "all_unlabeled", False))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, rgb, mask = self.source.load(self.order(pos))
        image, target = self.augment(rgb, mask, np.random.default_rng([self.seed, int(pos)]), self.normalize)
        if self.all_unlabeled:  # images without masks: everything but the padding (and 255) is the teacher's
            return image, torch.where(target == IGNORE, target, torch.full_like(target, UNLABELED))
        if self.reduce_zero:
            target = reduce_zero_label(target)
        if self.unlabeled.numel():
            target = torch.where(torch.isin(target, self.unlabeled), torch.full_like(target, UNLABELED), target)
        return image, target


@contextlib.contextmanager
def _norm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Run forward passes that leave every BatchNorm's running statistics (and batch count) as they were."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        for m, (mean, var, count) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)


class _LossForward(nn.Module):
    """``forward(images, target) = model.training_loss(images, target)``, so DDP sees the loss computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.training_loss(images, target)


class SegmenterTask(TrainTask):
    """See the module docstring.

    Args:
        config: the recipe.
        train_source: training pairs (pseudo-labels or ground truth).
        val_source: pairs scored by :meth:`validate` and at the end of the run (optional).
        model_factory: ``config -> network``; default :func:`build_network`.
        teacher: fills unlabelled pixels before ``self_train_from`` (see the module docstring).
        teacher_factory: ``(config, ctx, network) -> teacher``, called in :meth:`setup` with the recipe
            in force and the built network (instead of ``teacher``).
        val_limit: validate on at most this many pairs (the final evaluation uses all).
        evaluate_at_end: predict ``val_source`` after the last iteration, write ``OUT/eval/masks`` and
            ``OUT/eval/eval.json`` (``tag2mask eval``'s format) and export ``OUT/model.safetensors``.
    """

    name = "segmenter"
    recipe_type = SegmenterConfig

    def __init__(self, config: SegmenterConfig, train_source: SegmentationSource,
                 val_source: Optional[SegmentationSource] = None, model_factory: Optional[ModelFactory] = None,
                 teacher: Optional[Teacher] = None, val_limit: Optional[int] = None,
                 evaluate_at_end: bool = True, teacher_factory: Optional[TeacherFactory] = None) -> None:
        if teacher is not None and teacher_factory is not None:
            raise ValueError("pass a teacher or a teacher_factory, not both")
        self.config, self.train_source, self.val_source = config, train_source, val_source
        self.model_factory = model_factory or build_network
        self.teacher, self.val_limit, self.evaluate_at_end = teacher, val_limit, evaluate_at_end
        self.teacher_factory = teacher_factory
        self.max_grad_norm = config.max_grad_norm
        self.find_unused_parameters = config.ddp_find_unused
        self.final_eval: Optional[dict[str, Any]] = None

    # -- recipe -----------------------------------------------------------------------------------
    @property
    def max_iters(self) -> int:
        return self.config.max_iters

    def use_recipe(self, recipe: SegmenterConfig) -> None:
        self.config = recipe
        self.max_grad_norm = recipe.max_grad_norm
        self.find_unused_parameters = recipe.ddp_find_unused

    # -- model ------------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        model = self.model_factory(self.config).to(ctx.device)
        if self.config.sync_bn and ctx.world_size > 1 and ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.train()
        self.loss_forward = ctx.ddp(_LossForward(self.model))
        self.frozen = tuple(self.model.frozen_prefixes()) if hasattr(self.model, "frozen_prefixes") else ()
        if self.teacher_factory is not None:
            self.teacher = self.teacher_factory(self.config, ctx, self.model)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        return {"model": {k: v for k, v in self.model.state_dict().items() if not k.startswith(self.frozen)}}

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        result = self.model.load_state_dict(states["model"], strict=not self.frozen)
        missing = [k for k in getattr(result, "missing_keys", []) if not k.startswith(self.frozen)]
        if missing or getattr(result, "unexpected_keys", []):
            raise ValueError(f"checkpoint does not fit the network: missing {missing[:5]}, "
                             f"unexpected {list(result.unexpected_keys)[:5]}")

    def build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if hasattr(self.model, "parameter_groups"):
            named = self.model.parameter_groups()
            groups = [
                {"params": named.get("backbone", []), "lr": c.lr, "weight_decay": c.weight_decay},
                {"params": named.get("head", []), "lr": c.lr * c.head_lr_mult, "weight_decay": c.weight_decay},
                {"params": named.get("head_bias", []), "lr": c.lr * c.head_bias_lr_mult,
                 "weight_decay": c.weight_decay if c.head_bias_weight_decay else 0.0},
            ]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": c.lr,
                       "weight_decay": c.weight_decay}]
        if c.optimizer == "sgd":
            self._optimizer = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        else:
            self._optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        return self._optimizer

    def lr_multiplier(self, iteration: int) -> list[float]:
        c = self.config
        t = iteration if c.lr_step == 1 else (iteration // c.lr_step) * c.lr_step
        mult = poly_warmup_multiplier(t, max_iters=c.max_iters, warmup_iters=c.warmup_iters,
                                      warmup_ratio=c.warmup_ratio, power=c.poly_power)
        out = []
        for group in self._optimizer.param_groups:
            base = group.get("initial_lr", group["lr"])
            floor = min(c.min_lr / base, 1.0) if base > 0 else 0.0
            out.append(floor + (1.0 - floor) * mult)
        return out

    # -- data and step ----------------------------------------------------------------------------
    def batches(self, start: int, end: int) -> Iterable[Any]:
        ctx = self.ctx
        normalize = getattr(self.model, "normalization", None)
        if normalize is None:
            raise ValueError(f"{type(self.model).__name__} has no 'normalization' (the mean/std of its inputs)")
        crops = SegmentationCrops(self.train_source, self.config.augment(), normalize, ctx.seed,
                                  self.config.unlabeled_classes, self.config.reduce_zero_label)
        return position_loader(crops, start, end, self.config.batch_size, ctx.rank, ctx.world_size,
                               num_workers=ctx.num_workers, seed=ctx.seed, pin_memory=ctx.device.type == "cuda")

    def phase(self, iteration: int) -> str:
        """``teacher`` or ``self`` (self-training): which labels fill the unlabelled pixels at ``iteration``."""
        c = self.config
        return "self" if c.self_train_from is not None and iteration >= c.self_train_from else "teacher"

    def step(self, batch: Any, iteration: int) -> dict[str, Any]:
        images, target = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        phase = self.phase(iteration)
        if bool((target == UNLABELED).any()):
            target = self._label_unlabeled(images, target, iteration, phase)
        with self.ctx.autocast():
            losses = self.loss_forward(images, target)
        out: dict[str, Any] = {k: v for k, v in losses.items() if isinstance(v, torch.Tensor)}
        out["self_training"] = int(phase == "self")
        return out

    @torch.no_grad()
    def _label_unlabeled(self, images: torch.Tensor, target: torch.Tensor, iteration: int, phase: str) -> torch.Tensor:
        if phase == "self":
            # the labels come from the network as it trains (batch statistics), but only the loss
            # forward may update the running statistics, as in a single-forward implementation
            with _norm_statistics_kept(self.model), self.ctx.autocast():
                logits = self.model(images).float()
            if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
                logits = nn.functional.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            cats = torch.tensor(sorted(set(self.config.unlabeled_classes)), device=logits.device)
            labels = cats[logits[:, cats].argmax(dim=1)]
            target = fill_unlabeled(target, labels)
        elif self.teacher is not None:
            target = self.teacher(images, target, iteration)
        return torch.where(target == UNLABELED, torch.full_like(target, IGNORE), target)

    # -- checkpoint extras --------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        if self.teacher is not None and hasattr(self.teacher, "state_dict"):
            return {"teacher": self.teacher.state_dict()}
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "teacher" in state and self.teacher is not None and hasattr(self.teacher, "load_state_dict"):
            self.teacher.load_state_dict(state["teacher"])

    def checkpoint_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"class_names": self.config.class_names}
        model = getattr(self, "model", None)
        if model is not None and hasattr(model, "export_config"):
            meta["network"] = {"name": self.config.model, "config": model.export_config()}
        return meta

    # -- validation and the end of the run ------------------------------------------------------------
    def validate(self, iteration: int) -> Optional[dict[str, float]]:
        from tag2mask.segmenter.evaluation import evaluate_source

        if self.val_source is None:
            return None
        scores = evaluate_source(self.model, self.val_source, self.config, self.ctx, limit=self.val_limit)
        return {"miou": scores["scores"]["Mean IoU"], "pixel_acc": scores["scores"]["Pixel Accuracy"]}

    def finish(self, summary: dict[str, Any]) -> None:
        from tag2mask.segmenter.evaluation import evaluate_source, export_model

        out = self.ctx.out_dir
        if self.ctx.is_main:
            export_model(self.model, out / "model.safetensors", self.config)
        if self.evaluate_at_end and self.val_source is not None:
            self.final_eval = evaluate_source(self.model, self.val_source, self.config, self.ctx,
                                              write_dir=out / "eval")
            summary["eval"] = self.final_eval["scores"]["Mean IoU"]
