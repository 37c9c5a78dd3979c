"""Classify dense features against frozen CLIP text embeddings (MaskCLIP+ target model, CLIP-ZSS student).

Data flow (B images, F feature channels, D = CLIP joint dim, K text embeddings)::

    features (B, F, h, w) --1×1 projection (when F != D, or asked for)--> E (B, D, h, w)
    E --(cosine: L2-normalise over D)--> logits[b, k] = scale · <E[b, :, y, x], T[k]>   (B, K(+1), h, w)

``T`` are the frozen text embeddings, L2-normalised when set (a buffer: saved with the model, so a
trained student needs no CLIP text tower at test time, and :meth:`set_text_embeddings` swaps in
another vocabulary, e.g. seen + unseen classes for zero-shot inference). With
``learned_background`` a trainable embedding (``randn`` init, L2-normalised when used) is
prepended, so logit index 0 is background.

Presets of the papers:

* MaskCLIP+ (``cfg: maskclip_plus_*.py``): ``similarity='dot'``, scale 1, features not normalised,
  no projection (the ASPP head already outputs D channels), ``learned_background`` when the label
  set has a background class.
* CLIP-ZSS: ``similarity='cosine'``; the temperature is not published, the default scale
  ``1 / 0.07`` (CLIP's initial temperature) is an assumption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TextHeadConfig", "TextEmbeddingClassifier", "DEFAULT_COSINE_SCALE"]

#: 1 / 0.07, CLIP's initial temperature; the default for cosine similarity (an assumption for CLIP-ZSS).
DEFAULT_COSINE_SCALE = 1.0 / 0.07


@dataclass
class TextHeadConfig:
    """How a segmenter classifies against text embeddings (saved with the model).

    Attributes:
        similarity: ``dot`` (features unnormalised, MaskCLIP+) or ``cosine`` (CLIP-ZSS).
        logit_scale: multiplier of the similarities; ``None`` = 1 for ``dot``, 1/0.07 for ``cosine``.
        learn_logit_scale: make the scale a trainable parameter (stored as its log, like CLIP's).
        learned_background: prepend a trainable background embedding (logit index 0).
        projection: ``auto`` (1×1 conv to D only when the feature width differs from D),
            ``conv`` (always) or ``none`` (the features must already have D channels).
        embed_dim: D; filled in from the text embeddings when the model is built.
        num_texts: K; filled in from the text embeddings when the model is built.
    """

    similarity: str = "dot"
    logit_scale: Optional[float] = None
    learn_logit_scale: bool = False
    learned_background: bool = False
    projection: str = "auto"
    embed_dim: Optional[int] = None
    num_texts: Optional[int] = None

    def __post_init__(self) -> None:
        if self.similarity not in ("dot", "cosine"):
            raise ValueError(f"text_head.similarity must be 'dot' or 'cosine', got {self.similarity!r}")
        if self.projection not in ("auto", "conv", "none"):
            raise ValueError(f"text_head.projection must be 'auto', 'conv' or 'none', got {self.projection!r}")
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"text_head.logit_scale must be positive, got {self.logit_scale}")

    @property
    def scale(self) -> float:
        """The similarity multiplier actually used at initialisation."""
        if self.logit_scale is not None:
            return float(self.logit_scale)
        return 1.0 if self.similarity == "dot" else DEFAULT_COSINE_SCALE

    @property
    def num_outputs(self) -> int:
        """K plus one for the learned background."""
        if self.num_texts is None:
            raise ValueError("text_head.num_texts is unknown: build the model with text_embeddings")
        return self.num_texts + int(self.learned_background)


class TextEmbeddingClassifier(nn.Module):
    """Drop-in replacement for a segmentation head's final 1×1 conv: ``(B, F, h, w) -> (B, K(+1), h, w)``.

    Args:
        in_channels: F, the width of the features it receives.
        config: :class:`TextHeadConfig` (``embed_dim`` and ``num_texts`` must be known).
        text_embeddings: ``(K, D)`` text embeddings (normalised here); ``None`` leaves zeros to be
            filled by ``load_state_dict``.
    """

    def __init__(self, in_channels: int, config: TextHeadConfig, text_embeddings: Optional[Tensor] = None) -> None:
        super().__init__()
        if text_embeddings is not None:
            if text_embeddings.ndim != 2:
                raise ValueError(f"text_embeddings must be (K, D), got shape {tuple(text_embeddings.shape)}")
            k, d = text_embeddings.shape
            if config.embed_dim not in (None, d) or config.num_texts not in (None, k):
                raise ValueError(
                    f"text_embeddings {tuple(text_embeddings.shape)} disagree with the config "
                    f"(num_texts={config.num_texts}, embed_dim={config.embed_dim})"
                )
            config.embed_dim, config.num_texts = d, k
        if config.embed_dim is None or config.num_texts is None:
            raise ValueError("a text-embedding head needs text_embeddings (K, D) or embed_dim and num_texts in its config")
        self.config = config
        dim = config.embed_dim
        use_proj = config.projection == "conv" or (config.projection == "auto" and in_channels != dim)
        if config.projection == "none" and in_channels != dim:
            raise ValueError(f"projection='none' needs {dim}-channel features, got {in_channels}")
        self.proj: nn.Module = nn.Conv2d(in_channels, dim, kernel_size=1) if use_proj else nn.Identity()
        self.register_buffer("text", torch.zeros(config.num_texts, dim))
        if text_embeddings is not None:
            self.set_text_embeddings(text_embeddings)
        self.background = nn.Parameter(torch.randn(1, dim)) if config.learned_background else None
        log_scale = torch.tensor(math.log(config.scale))
        if config.learn_logit_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def num_outputs(self) -> int:
        """Logit channels: K (+1 with the learned background)."""
        return self.text.shape[0] + int(self.background is not None)

    @torch.no_grad()
    def set_text_embeddings(self, text_embeddings: Tensor) -> None:
        """Replace the class embeddings (``(K', D)``, any K'); they are L2-normalised and frozen."""
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.text.shape[1]:
            raise ValueError(
                f"text embeddings must be (K, {self.text.shape[1]}), got shape {tuple(text_embeddings.shape)}"
            )
        t = F.normalize(text_embeddings.detach().float(), dim=-1).to(self.text.device)
        self.text = t.contiguous()
        self.config.num_texts = t.shape[0]

    def class_embeddings(self) -> Tensor:
        """``(K(+1), D)``: the normalised background embedding (if any) followed by the text embeddings."""
        if self.background is None:
            return self.text
        return torch.cat([F.normalize(self.background, dim=-1), self.text.to(self.background.dtype)])

    def embed(self, features: Tensor) -> Tensor:
        """Dense features in the joint space: ``(B, F, h, w) -> (B, D, h, w)`` (not normalised)."""
        return self.proj(features)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, F, h, w)`` features -> ``(B, K(+1), h, w)`` logits."""
        return self.logits_from_embeddings(self.embed(features))

    def logits_from_embeddings(self, emb: Tensor, scale: Optional[float] = None) -> Tensor:
        """Logits of joint-space embeddings ``(B, D, h, w)`` (what :meth:`embed` returns) -> ``(B, K(+1), h, w)``.

        ``scale`` replaces the head's own logit scale (CLIP-ZSS's α).
        """
        if self.config.similarity == "cosine":
            emb = F.normalize(emb, dim=1)
        weights = self.class_embeddings().to(emb.dtype)
        mult = self.log_scale.exp().to(emb.dtype) if scale is None else float(scale)
        return torch.einsum("bdhw,kd->bkhw", emb, weights) * mult

    def extra_repr(self) -> str:
        c = self.config
        return f"texts={self.text.shape[0]}, dim={self.text.shape[1]}, similarity={c.similarity}, background={c.learned_background}"
