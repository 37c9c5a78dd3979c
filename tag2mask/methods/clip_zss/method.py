"""CLIP-ZSS ("CLIP Is Also a Good Teacher", Chen et al., 2024): the training pipeline in one place.

A reimplementation from the paper's equations (no official code exists); the open values are the
named fields of :class:`~tag2mask.methods.clip_zss.config.ClipZssConfig`. One training step::

    crop (student-normalised), labels (seen classes, 255 = ignored; unseen pixels are ignored too)
    teacher (frozen CLIP image tower, no gradient):   S = CLS embedding (B, D),  X = dense tokens (B, D, h', w')
    student:                                          R = head.embed(forward_features(crop))      (B, D, h, w)
    GLM   L_global = InfoNCE(attention-pool(S, R), S, CLS bank)                         glm.py
    PLM   regions  = multi-scale K-means(X) + mask fusion;  F = labels + regions in the ignored pixels   regions.py
          P        = synthesizer(centroids of R under F, memory = S);  P_seen, P_pseudo           synthesizer.py
          x        = [ α·cos(R, T_seen) , β·cos(R, P_pseudo) ]                                (B, K + M, h, w)
          L_nel(x, F) (focal ×100 + dice) + CE(x, F) + BCE(P_seen, T_seen)                  losses.py
    L = w_g·L_global + w_n·L_nel + w_c·CE + w_b·L_bce

Only the student and the synthesizer learn. ``T_seen`` holds the seen class names only: the unseen
names are not embedded before training ends (checked in every step). At test time the student alone
classifies ``R`` against the text embeddings of any class names (the synthesizer and the CLIP image
tower are not used; :mod:`tag2mask.methods.clip_zss.inference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tag2mask.methods.clip_zss.config import ClipZssConfig
from tag2mask.methods.clip_zss.glm import glm_loss
from tag2mask.methods.clip_zss.losses import nel_loss
from tag2mask.methods.clip_zss.regions import IGNORE, fuse_labels, pseudo_regions
from tag2mask.methods.clip_zss.synthesizer import Synthesizer, bce_to_text, region_centroids
from tag2mask.vocab.zero_shot_splits import SeenUnseenNames

__all__ = ["ClassLayout", "ClipZss", "UnseenNameError", "embed_class_names", "check_no_unseen"]

#: pseudo logits of an image's unused potential-category slots (never a target; softmax weight 0)
_NO_REGION = -1e4


class UnseenNameError(AssertionError):
    """An unseen class name was about to enter training."""


@dataclass(frozen=True)
class ClassLayout(SeenUnseenNames):
    """How a data set's label values relate to the student's outputs.

    ``class_names``: label value ``k`` -> name (index 0 ``background`` unless ``background == "none"``).
    In training the student's text head holds the seen foreground names (label order); with
    ``background == "class"`` a learned background embedding is output 0. At test time it holds all
    foreground names; output ``i`` is label value ``i + label_offset``.
    """

    class_names: tuple[str, ...]
    unseen: tuple[str, ...]
    background: str

    def __post_init__(self) -> None:
        unknown = [n for n in self.unseen if n not in self.foreground]
        if unknown:
            raise ValueError(f"unseen classes {unknown} are not among the data set's classes")
        if not self.seen:
            raise ValueError("every class is unseen: nothing to train on")

    @property
    def learned_background(self) -> bool:
        return self.background == "class"

    @property
    def num_train_outputs(self) -> int:
        """Logit channels of the student during training (seen classes + learned background)."""
        return len(self.seen) + int(self.learned_background)

    @property
    def label_offset(self) -> int:
        """Label value of test output 0 (1 when background is ignored: outputs are the foreground)."""
        return 1 if self.background == "ignore" else 0

    @property
    def unseen_ids(self) -> tuple[int, ...]:
        return tuple(self.class_names.index(n) for n in self.unseen)

    def train_lookup(self) -> Tensor:
        """``(256,)`` int64: label value -> training output index, or 255 (unseen, ignored background, void)."""
        lut = torch.full((256,), IGNORE, dtype=torch.int64)
        first = int(self.learned_background)
        for i, name in enumerate(self.seen):
            lut[self.class_names.index(name)] = first + i
        if self.learned_background:
            lut[0] = 0
        return lut


def check_no_unseen(names: Sequence[str], unseen: Sequence[str]) -> None:
    """Raise :class:`UnseenNameError` if ``names`` contains an unseen class name (case-insensitive)."""
    bad = sorted({n for n in names if n.lower() in {u.lower() for u in unseen}})
    if bad:
        raise UnseenNameError(f"unseen class names {bad} must not be used in training")


def embed_class_names(text_model: Any, names: Sequence[str], templates: str,
                      prompts: Optional[dict[str, str]] = None) -> Tensor:
    """Text embeddings ``(K, D)`` of class ``names`` (``prompts`` maps a name to its prompt words)."""
    from tag2mask.clip.text_embed import embed_names
    from tag2mask.vocab.templates import get_templates

    words = [(prompts or {}).get(n, n) for n in names]
    return embed_names(text_model, words, get_templates(templates))


class ClipZss(nn.Module):
    """The trainable part of CLIP-ZSS: the student and the synthesizer; ``forward`` returns the losses.

    Args:
        student: a :mod:`tag2mask.models` network with a cosine text head holding ``T_seen``.
        config: the method's settings.
        num_seen_outputs: the text head's channel count in training (seen classes + background).
    """

    def __init__(self, student: nn.Module, config: ClipZssConfig, num_seen_outputs: int) -> None:
        super().__init__()
        head = getattr(student, "text_classifier", None)
        if head is None:
            raise ValueError("the CLIP-ZSS student needs a text-embedding head (build it with text_embeddings)")
        self.student, self.config, self.num_seen_outputs = student, config, int(num_seen_outputs)
        dim = head.text.shape[1]
        self.synthesizer = (Synthesizer(dim, config.synth_depth, config.synth_heads, config.synth_ffn_mult)
                            if config.use_plm else None)

    @property
    def head(self):
        return self.student.text_classifier

    @torch.no_grad()
    def pseudo_labels(self, labels: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """``F`` and the number of potential categories per image (see :mod:`.regions`); labels unchanged without PLM."""
        c = self.config
        if not c.use_plm:
            return labels, torch.zeros(labels.shape[0], dtype=torch.int64)
        regions = pseudo_regions(dense, tuple(labels.shape[-2:]), tuple(c.kmeans_windows), c.kmeans_iters,
                                 c.fusion_threshold)
        min_pixels = max(1, round(c.min_region_fraction * labels.shape[-2] * labels.shape[-1]))
        return fuse_labels(labels, regions.to(labels.device), self.num_seen_outputs, c.max_regions, min_pixels)

    def prediction(self, emb: Tensor, prototypes: Optional[Tensor], counts: Tensor) -> tuple[Tensor, Tensor]:
        """The combined prediction ``x (B, K + M, h, w)`` and its valid channels ``(B, K + M)``."""
        c = self.config
        x_seen = self.head.logits_from_embeddings(emb, scale=c.alpha)
        k = x_seen.shape[1]
        if prototypes is None:
            return x_seen, torch.ones(x_seen.shape[:2], dtype=torch.bool, device=emb.device)
        pseudo = prototypes[:, k:]                                      # (B, M, D)
        cos = torch.einsum("bdhw,bmd->bmhw", F.normalize(emb, dim=1), F.normalize(pseudo, dim=-1))
        slots = torch.arange(pseudo.shape[1], device=emb.device)[None] < counts.to(emb.device)[:, None]
        x_pseudo = torch.where(slots[..., None, None], c.beta * cos, torch.full_like(cos, _NO_REGION))
        valid = torch.cat([torch.ones_like(slots[:, :1]).expand(-1, k), slots], dim=1)
        return torch.cat([x_seen, x_pseudo.to(x_seen.dtype)], dim=1), valid

    def forward(self, images: Tensor, labels: Tensor, counts: Tensor, cls: Tensor, dense: Tensor,
                bank: Optional[Tensor], num_masks: Optional[float] = None) -> dict[str, Tensor]:
        """All losses of one batch.

        Args:
            images: student-normalised crops ``(B, 3, S, S)``.
            labels: ``F`` from :meth:`pseudo_labels` ``(B, S, S)``: training outputs ``0..K-1``,
                potential categories ``K..K+M-1``, 255.
            counts: ``(B,)`` potential categories per image.
            cls, dense: the teacher's outputs; bank: past CLS embeddings ``(N, D)`` or ``None``.
            num_masks: NEL normaliser (averaged over the processes by the caller), default local.

        Returns:
            ``{"loss": total, "glm", "nel_focal", "nel_dice", "ce", "bce": detached terms}``.
        """
        from tag2mask.models.base import segmentation_cross_entropy

        c, head = self.config, self.head
        if head.text.shape[0] + int(head.background is not None) != self.num_seen_outputs:
            raise UnseenNameError(f"the student's text head holds {head.text.shape[0]} classes in training; only "
                                  f"the {self.num_seen_outputs} seen outputs may be there")
        emb = self.student.dense_embeddings(images)                    # R (B, D, h, w)
        out: dict[str, Tensor] = {}
        total = emb.new_zeros(())
        if c.use_glm and c.glm_weight:
            term = glm_loss(cls, emb, bank, c.glm_temperature, c.glm_attention_scale)
            out["glm"], total = term.detach(), total + c.glm_weight * term
        prototypes = None
        if self.synthesizer is not None:
            k = self.num_seen_outputs
            centroids, present = region_centroids(emb.float(), labels, k + c.max_regions)
            memory = cls[:, None].float()
            if c.synth_memory == "cls+dense":
                memory = torch.cat([memory, dense.flatten(2).transpose(1, 2).float()], dim=1)
            prototypes = self.synthesizer(centroids, present, memory)  # (B, K + M, D)
            seen = present[:, :k]
            classes = torch.nonzero(seen)[:, 1]
            term = bce_to_text(prototypes[:, :k][seen], classes, head.class_embeddings(),
                               float(head.log_scale.exp()))
            out["bce"], total = term.detach(), total + c.bce_weight * term
        x, valid = self.prediction(emb, prototypes, counts)
        if c.nel_weight:
            focal, dice = nel_loss(x, labels, valid, num_masks, c.focal_alpha, c.focal_gamma)
            out["nel_focal"], out["nel_dice"] = focal.detach(), dice.detach()
            total = total + c.nel_weight * (c.focal_weight * focal + c.dice_weight * dice)
        if c.ce_weight:
            term = segmentation_cross_entropy(x, labels)
            out["ce"], total = term.detach(), total + c.ce_weight * term
        out["loss"] = total
        return out
