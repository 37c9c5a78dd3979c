"""CLIP-ZSS on the training engine: the segmenter trainer's data side, the method's losses, a CLS bank.

:class:`ClipZssTask` is a :class:`~tag2mask.segmenter.task.SegmenterTask` (same crops,
augmentation, position-based stream, optimiser groups and poly schedule, same ``SegmenterConfig``)
whose network is a text-head student (:mod:`tag2mask.models`, e.g. SegFormer or the frozen-CLIP
decoder) and whose step is :class:`~tag2mask.methods.clip_zss.method.ClipZss`:

1. the crop's labels are mapped to training outputs (seen classes; unseen classes, an ignored
   background and void become 255);
2. the frozen CLIP teacher gives the CLS embedding and dense tokens of the same crop;
3. PLM pastes class-agnostic regions into the ignored pixels; GLM uses the CLS bank;
4. the student + synthesizer losses (wrapped for DDP); the batch's CLS embeddings (of every
   process) enter the bank afterwards.

Checkpoints hold the student (without a frozen CLIP backbone), the synthesizer and the bank
(``extra_state``), so a resumed run equals an uninterrupted one. At the end the student is exported
with the text embeddings of *all* the data set's classes (``OUT/model.safetensors``) and scored with
mIoU(S), mIoU(U) and hIoU (``OUT/eval/eval.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from tag2mask.config import DictConfig
from tag2mask.data.segmentation import SegmentationSource
from tag2mask.methods.clip_zss.config import ClipZssConfig
from tag2mask.methods.clip_zss.glm import ClsBank
from tag2mask.methods.clip_zss.inference import evaluate_zero_shot, text_vocabulary
from tag2mask.methods.clip_zss.method import ClassLayout, ClipZss, check_no_unseen, embed_class_names
from tag2mask.methods.clip_zss.regions import IGNORE
from tag2mask.methods.clip_zss.teacher import ClipTeacher
from tag2mask.engine.loop import TrainContext
from tag2mask.segmenter.task import SegmenterConfig, SegmenterTask

__all__ = ["ClipZssRecipe", "ClipZssTask", "split_prompts"]


def split_prompts(zss: ClipZssConfig) -> dict[str, str]:
    """``{class name: prompt words}`` of the run's named split (empty without one)."""
    if not zss.split:
        return {}
    from tag2mask.vocab.zero_shot_splits import find_split

    split = find_split(zss.split)
    return dict(split.prompt_names) if split is not None else {}


@dataclass
class ClipZssRecipe(DictConfig):
    """A CLIP-ZSS run's recipe as stored in its checkpoints: the student's part and the method's part."""

    segmenter: SegmenterConfig
    zss: ClipZssConfig


class ClipZssTask(SegmenterTask):
    """See the module docstring.

    Args:
        config: the student's recipe (network, data, optimiser, schedule, test settings); its
            ``classes`` / ``background`` describe the data set's labels (seen and unseen).
        zss: the method's settings (unseen classes, GLM, PLM, losses).
        train_source, val_source: image + mask pairs (``val_source`` is scored at the end).
        clip_weights: the frozen CLIP (teacher and text encoder), or pass ``clip_model``.
    """

    name = "clip-zss"
    recipe_type = ClipZssRecipe

    def __init__(self, config: SegmenterConfig, zss: ClipZssConfig, train_source: SegmentationSource,
                 val_source: Optional[SegmentationSource] = None, clip_weights: Optional[str] = None,
                 clip_model: Any = None, val_limit: Optional[int] = None, evaluate_at_end: bool = True) -> None:
        super().__init__(config, train_source, val_source, val_limit=val_limit, evaluate_at_end=evaluate_at_end)
        if clip_weights is None and clip_model is None:
            raise ValueError("CLIP-ZSS needs the CLIP weights of its teacher (clip_weights or clip_model)")
        self.clip_weights, self._clip = clip_weights, clip_model
        self._set_recipe(config, zss)

    def _set_recipe(self, config: SegmenterConfig, zss: ClipZssConfig) -> None:
        if (zss.background == "none") == bool(config.background):
            raise ValueError(f"background={zss.background!r} needs SegmenterConfig.background="
                             f"{zss.background != 'none'} (whether label 0 is background)")
        self.config, self.zss = config, zss
        self.layout = ClassLayout(tuple(config.class_names), tuple(zss.unseen), zss.background)
        self.max_grad_norm = config.max_grad_norm
        self.find_unused_parameters = config.ddp_find_unused

    # -- recipe -----------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return ClipZssRecipe(self.config, self.zss).to_dict()

    def use_recipe(self, recipe: ClipZssRecipe) -> None:
        self._set_recipe(recipe.segmenter, recipe.zss)

    # -- model ------------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        from tag2mask.clip.loading import load_clip
        from tag2mask.models import build_segmenter

        self.ctx, c, zss = ctx, self.config, self.zss
        clip = self._clip if self._clip is not None else load_clip(self.clip_weights, device=ctx.device)
        clip = clip.to(ctx.device)
        self.clip_fingerprint = getattr(clip, "fingerprint", None)
        self.clip_source = self.clip_weights or getattr(clip, "source_path", None)
        self.teacher = ClipTeacher(clip.visual, zss.teacher_dense, zss.teacher_size).to(ctx.device)
        check_no_unseen(self.layout.seen, self.layout.unseen)
        self.prompts = split_prompts(zss)
        self.seen_text = embed_class_names(clip, self.layout.seen, zss.templates, self.prompts)
        self.text_model = clip
        options = dict(c.model_options)
        head = dict(options.pop("text_head", None) or {})
        head.setdefault("similarity", "cosine")
        head.setdefault("learned_background", self.layout.learned_background)
        if bool(head["learned_background"]) != self.layout.learned_background:
            raise ValueError(f"text_head.learned_background must be {self.layout.learned_background} "
                             f"with background={zss.background!r}")
        extra = {"clip_model": clip} if c.model == "clip-decoder" else {}
        if c.model == "clip-decoder":
            options.setdefault("clip_weights", self.clip_source)
        student = build_segmenter(c.model, self.layout.num_train_outputs, text_embeddings=self.seen_text,
                                  text_head=head, **extra, **options)
        self.model = student.to(ctx.device).train()
        self.frozen = tuple(student.frozen_prefixes())
        self.method = ClipZss(student, zss, self.layout.num_train_outputs).to(ctx.device)
        self.loss_forward = ctx.ddp(self.method)
        self.bank = ClsBank(zss.glm_bank_size, self.seen_text.shape[1])
        self.lookup = self.layout.train_lookup().to(ctx.device)
        mean = torch.tensor(student.normalization.mean, device=ctx.device).view(1, 3, 1, 1)
        std = torch.tensor(student.normalization.std, device=ctx.device).view(1, 3, 1, 1)
        self._unnormalize = (mean, std)

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"model": self.model}
        if self.method.synthesizer is not None:
            mods["synthesizer"] = self.method.synthesizer
        return mods

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        out = super().state_dicts()
        if self.method.synthesizer is not None:
            out["synthesizer"] = self.method.synthesizer.state_dict()
        return out

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        super().load_state_dicts({"model": states["model"]})
        if self.method.synthesizer is not None:
            self.method.synthesizer.load_state_dict(states["synthesizer"])

    def build_optimizer(self) -> torch.optim.Optimizer:
        opt = super().build_optimizer()
        if self.method.synthesizer is not None:
            c = self.config
            mult = self.zss.synth_lr_mult if self.zss.synth_lr_mult is not None else c.head_lr_mult
            opt.add_param_group({"params": list(self.method.synthesizer.parameters()), "lr": c.lr * mult,
                                 "weight_decay": c.weight_decay})
        return opt

    # -- step -------------------------------------------------------------------------------------
    def step(self, batch: Any, iteration: int) -> dict[str, Any]:
        ctx, zss = self.ctx, self.zss
        images, target = (t.to(ctx.device, non_blocking=True) for t in batch)
        labels = self.lookup[target.clamp(0, 255)]
        mean, std = self._unnormalize
        teacher = self.teacher(images.float() * std + mean)
        labels, counts = self.method.pseudo_labels(labels, teacher.dense)
        num_masks = None
        if zss.nel_weight:
            local = sum(int((torch.unique(f) != IGNORE).sum()) for f in labels)
            num_masks = float(ctx.all_reduce_sum(torch.tensor(float(local), device=ctx.device))) / ctx.world_size
        bank = self.bank.tensor(ctx.device) if zss.use_glm else None
        with ctx.autocast():
            losses = self.loss_forward(images, labels, counts, teacher.cls, teacher.dense, bank, num_masks)
        if zss.use_glm:
            self.bank.push(torch.cat([c.to(torch.float32) for c in ctx.all_gather(teacher.cls.detach().cpu())]))
        out: dict[str, Any] = {k: v for k, v in losses.items() if isinstance(v, torch.Tensor)}
        out["pseudo_regions"] = counts.float().mean()
        return out

    # -- checkpoint extras --------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "bank" in state:
            self.bank.load_state_dict(state["bank"])

    def checkpoint_meta(self) -> dict[str, Any]:
        names = (["background"] if self.layout.learned_background else []) + list(self.layout.seen)
        meta: dict[str, Any] = {"class_names": names, "clip": {"weights": getattr(self, "clip_source", self.clip_weights),
                                                               "fingerprint": getattr(self, "clip_fingerprint", None)},
                                "prompts": getattr(self, "prompts", split_prompts(self.zss)),
                                "dataset_classes": list(self.layout.class_names), "unseen": list(self.layout.unseen)}
        model = getattr(self, "model", None)
        if model is not None:
            meta["network"] = {"name": self.config.model, "config": model.export_config()}
        return meta

    # -- validation and the end of the run ------------------------------------------------------------
    def all_text(self) -> torch.Tensor:
        """Text embeddings of every foreground class (seen and unseen): for scoring only, never trained on."""
        if getattr(self, "_all_text", None) is None:
            self._all_text = embed_class_names(self.text_model, self.layout.foreground, self.zss.templates,
                                               self.prompts)
        return self._all_text

    def validate(self, iteration: int) -> Optional[dict[str, float]]:
        if self.val_source is None:
            return None
        with text_vocabulary(self.model, self.all_text()):
            report = evaluate_zero_shot(self.model, self.val_source, self.config, self.layout, self.ctx,
                                        limit=self.val_limit)
        su = report["seen_unseen"]
        return {"miou": report["scores"]["Mean IoU"], "miou_seen": su["mIoU_seen"], "miou_unseen": su["mIoU_unseen"],
                "hiou": su["hIoU"]}

    def finish(self, summary: dict[str, Any]) -> None:
        from tag2mask.models import save_segmenter

        out = self.ctx.out_dir
        with text_vocabulary(self.model, self.all_text()):
            if self.ctx.is_main:
                names = (["background"] if self.layout.learned_background else []) + list(self.layout.foreground)
                save_segmenter(self.model, out / "model.safetensors", metadata={
                    "class_names": json.dumps(names), "label_offset": str(self.layout.label_offset),
                    "trained_by": "tag2mask train clip-zss"})
            if self.evaluate_at_end and self.val_source is not None:
                self.final_eval = evaluate_zero_shot(self.model, self.val_source, self.config, self.layout, self.ctx,
                                                     write_dir=out / "eval")
                summary["eval"] = self.final_eval["seen_unseen"]
