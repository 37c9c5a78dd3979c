"""The CLIP model (image tower + text tower) and its configuration, inferred from a state dict."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from tag2mask.config import DictConfig
from tag2mask.clip.layers import LayerNorm, Transformer
from tag2mask.clip.resnet import ModifiedResNet
from tag2mask.clip.vision import VisionTransformer

# CLIP's own input normalisation (0..1 RGB); ImageNet's is used by some official pipelines under compat.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VisionConfig:
    """Image tower. ``layers`` is an int for a ViT, a 4-tuple of stage depths for a ModifiedResNet."""

    width: int
    layers: Union[int, tuple[int, int, int, int]]
    heads: int
    image_size: int
    patch_size: Optional[int] = None  # None for ResNets

    @property
    def is_vit(self) -> bool:
        return isinstance(self.layers, int)


@dataclass
class TextConfig:
    width: int
    layers: int
    heads: int
    context_length: int = 77
    vocab_size: int = 49408


@dataclass
class CLIPConfig(DictConfig):
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    activation: str = "quick_gelu"
    ln_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        v = self.vision
        if v.is_vit:
            img = f"ViT-{v.patch_size}px width {v.width}, {v.layers} blocks, {v.heads} heads, {v.image_size}px"
        else:
            img = f"ModifiedResNet {tuple(v.layers)} width {v.width}, {v.image_size}px"
        t = self.text
        return f"{img}; text width {t.width}, {t.layers} blocks, {t.heads} heads; embed dim {self.embed_dim}"


class CLIP(nn.Module):
    """CLIP in OpenAI's parameter layout: ``visual.*`` image tower, text tower at the top level."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        v, t = config.vision, config.text
        if v.is_vit:
            self.visual: Union[VisionTransformer, ModifiedResNet] = VisionTransformer(
                image_size=v.image_size,
                patch_size=v.patch_size,
                width=v.width,
                layers=v.layers,
                heads=v.heads,
                output_dim=config.embed_dim,
                activation=config.activation,
                ln_eps=config.ln_eps,
            )
        else:
            self.visual = ModifiedResNet(
                layers=tuple(v.layers), output_dim=config.embed_dim, heads=v.heads, input_resolution=v.image_size, width=v.width
            )
        self.context_length = t.context_length
        self.transformer = Transformer(t.width, t.layers, t.heads, config.activation, config.ln_eps)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.randn(t.context_length, t.width) * 0.01)
        self.ln_final = LayerNorm(t.width, eps=config.ln_eps)
        self.text_projection = nn.Parameter(torch.randn(t.width, config.embed_dim) * t.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.register_buffer("causal_mask", self._causal_mask(t.context_length), persistent=False)
        # set by the loader: identifies the weights for caches (text embeddings) and run records
        self.fingerprint: str = "random-init"
        self.source_format: str = "constructed"

    @staticmethod
    def _causal_mask(n: int) -> torch.Tensor:
        return torch.full((n, n), float("-inf")).triu_(1)

    @property
    def is_vit(self) -> bool:
        return isinstance(self.visual, VisionTransformer)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Standard CLIP image embedding, not normalised: (B, 3, H, W) -> (B, D)."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embedding at the EOT token (the highest id), not normalised: (N, ctx) long -> (N, D)."""
        # the embedding table is not converted to fp16 by the official loaders; its rows enter the
        # tower in the tower's dtype (``.type(self.dtype)`` in OpenAI's code)
        return self.encode_token_embeddings(self.token_embedding(tokens).to(self.dtype), tokens.argmax(dim=-1))

    def encode_token_embeddings(self, embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        """The text tower on already embedded tokens, not normalised: (N, ctx, W), (N,) long -> (N, D).

        ``embeddings`` replaces ``token_embedding(tokens)`` (learned prompt contexts, CoOp); the text
        positional embedding is added here; the output is read at ``eot_positions``.
        """
        n_ctx = embeddings.shape[1]
        x = embeddings + self.positional_embedding[:n_ctx].to(embeddings.dtype)
        mask = self.causal_mask[:n_ctx, :n_ctx].to(x.dtype)
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), eot_positions.to(x.device)]
        return eot @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Contrastive logits ``(logits_per_image (B, N), logits_per_text (N, B))``."""
        img = nn.functional.normalize(self.encode_image(images), dim=-1)
        txt = nn.functional.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------------
# architecture inference

_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


def config_from_state_dict(sd: dict[str, torch.Tensor], activation: str = "quick_gelu") -> CLIPConfig:
    """Infer the architecture from an OpenAI-layout state dict (as OpenAI's ``build_model`` does).

    Head counts follow OpenAI's convention (width / 64 for both towers, 32*width/64 for ResNets).
    """
    embed_dim = sd["text_projection"].shape[1]
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(width=width, layers=layers, heads=max(1, width // 64), image_size=grid * patch, patch_size=patch)
    elif "visual.attnpool.positional_embedding" in sd:
        counts = []
        for stage in (1, 2, 3, 4):
            counts.append(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{stage}.")}))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(width=width, layers=tuple(counts), heads=width * 32 // 64, image_size=grid * 32)
    else:
        raise KeyError("no image tower found (expected 'visual.proj' for a ViT or 'visual.attnpool.*' for a ResNet)")
    t_width = sd["ln_final.weight"].shape[0]
    t_layers = len({k.split(".")[2] for k in sd if re.match(r"transformer\.resblocks\.\d+\.", k)})
    text = TextConfig(
        width=t_width,
        layers=t_layers,
        heads=max(1, t_width // 64),
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
    )
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, activation=activation)


def strip_non_parameters(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop the bookkeeping entries OpenAI's archives carry and a ``module.`` DataParallel prefix."""
    out = {}
    for k, v in sd.items():
        if k in _NON_PARAMETER_KEYS:
            continue
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out
