"""CLIP's text encoder on its own: for code that needs class-name embeddings but no image tower.

:func:`load_clip_text` reads the same sources as :func:`~tag2mask.clip.loading.load_clip`, builds
only the text side (token and positional embeddings, transformer, ``ln_final``, projection) and
drops the ``visual.*`` tensors without building a module for them. Its ``fingerprint`` is the full
model's, so the text-embedding cache (:mod:`tag2mask.clip.text_embed`) is shared with it.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from tag2mask.clip.layers import LayerNorm, Transformer
from tag2mask.clip.loading import (
    PathLike, WeightsError, file_fingerprint, read_state_dict, resolve_weights_path,
)
from tag2mask.clip.model import CLIP, CLIPConfig, config_from_state_dict

__all__ = ["TextTower", "load_clip_text"]


class TextTower(nn.Module):
    """The text half of :class:`~tag2mask.clip.model.CLIP` (same parameter names, same ``encode_text``)."""

    # the text path of CLIP only reads the attributes defined below, so its methods are reused as they are
    encode_text = CLIP.encode_text
    encode_token_embeddings = CLIP.encode_token_embeddings

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        t = config.text
        self.config = config
        self.context_length = t.context_length
        self.transformer = Transformer(t.width, t.layers, t.heads, config.activation, config.ln_eps)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width, eps=config.ln_eps)
        self.text_projection = nn.Parameter(torch.zeros(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("causal_mask", torch.full((t.context_length,) * 2, float("-inf")).triu_(1),
                             persistent=False)
        self.fingerprint: str = "random-init"

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype


def load_clip_text(source: PathLike, device: Union[str, torch.device] = "cpu",
                   allow_download: Optional[bool] = None, cache_dir: Optional[PathLike] = None) -> TextTower:
    """The text encoder of the CLIP weights ``source`` (eval mode, frozen, float32)."""
    path = resolve_weights_path(source, allow_download, cache_dir)
    sd, config, _ = read_state_dict(path)
    try:
        config = config or config_from_state_dict(sd)
    except KeyError as e:
        raise WeightsError(f"{path}: not a CLIP state dict ({e.args[0]})") from e
    tower = TextTower(config)
    text_sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if not k.startswith("visual.")}
    try:
        tower.load_state_dict(text_sd)
    except RuntimeError as e:
        raise WeightsError(f"{path}: the text encoder's weights do not fit ({e})") from e
    tower.fingerprint = file_fingerprint(path)
    tower.source_path = str(path)
    return tower.requires_grad_(False).to(device).eval()
