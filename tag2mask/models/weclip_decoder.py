"""WeCLIP decoder: multi-layer CLIP feature fusion, transformer decoder, affinity prediction.

Data flow (ViT-B/16, 320×320 crop: C = 768, h = w = 20)::

    features (11, B, C, h, w)           outputs of CLIP blocks 1..11, CLS dropped
      └─ per-layer MLP_l: C → 256 → 256 (ReLU between)           11 × (B, 256, h, w)
      └─ concat → 1×1 conv 2816 → 256 → Dropout2d(0.1)          fused F_u (B, 256, h, w)
           ├─ affinity = sigmoid(F_uᵀ F_u)                       (B, hw, hw)
           └─ 3 pre-LN transformer blocks (8 heads, QuickGELU, no positional embedding)
              └─ 1×1 classifier                                  seg logits (B, num_classes, h, w)

Numerics: the official attention module runs the attention **output projection in fp16**
(input, weight and bias cast to half, fp16 result added to the fp32 residual). With
``compat_fp16_out_proj=True`` this cast is reproduced; with ``False`` everything is float32
(differences ~5e-4 in the logits).

The decoder is shared: WeCLIP (:mod:`tag2mask.methods.weclip`) trains it on online pseudo labels,
:class:`tag2mask.models.clip_backbone.ClipDecoder` on any labels (1×1 or text-embedding classifier).

Parameter names are our own; :func:`load_official_decoder_state` converts a state dict of the
official code (``decoder_fts_fuse.*`` / ``decoder.*``) to them.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "WeCLIPDecoder",
    "WeCLIPDecoderOutput",
    "load_official_decoder_state",
    "to_official_decoder_state",
    "count_trainable_parameters",
]


class WeCLIPDecoderOutput(NamedTuple):
    """Outputs of :class:`WeCLIPDecoder`.

    Attributes:
        seg_logits: ``(B, num_classes, h, w)`` float32 logits at stride 16.
        affinity: ``(B, hw, hw)`` float32 ``sigmoid(F_uᵀ F_u)`` (row-major positions), the
            ``attn_pred`` of the original.
        fused: ``(B, embed_dim, h, w)`` float32 fused features ``F_u`` (after dropout).
    """

    seg_logits: Tensor
    affinity: Tensor
    fused: Tensor


class LayerMLP(nn.Module):
    """Token-wise ``Linear(in, d) → ReLU → Linear(d, d)`` for one CLIP block output."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, embed_dim)
        self.fc2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_channels)`` → ``(..., embed_dim)``."""
        return self.fc2(F.relu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed QKV projection (CLIP / ``nn.MultiheadAttention`` layout).

    Args:
        dim: model width.
        heads: number of heads.
        compat_fp16_out_proj: run the output projection in fp16 like WeCLIP's attention module.
    """

    def __init__(self, dim: int, heads: int, compat_fp16_out_proj: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.compat_fp16_out_proj = compat_fp16_out_proj
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        # Same initialisation as nn.MultiheadAttention (xavier in-projection, zero biases).
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(L, B, D)`` float32 tokens → ``(L, B, D)`` (fp16 when the compat cast is on)."""
        seq, b, dim = x.shape
        hd = dim // self.heads
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)

        # (L, B, D) -> (B*heads, L, hd): the batch-major head layout of the original, so that the
        # fp16 rounding of the output projection sees the same float32 values.
        def split(t: Tensor) -> Tensor:
            return t.contiguous().view(seq, b * self.heads, hd).transpose(0, 1)

        q, k, v = split(q), split(k), split(v)
        attn = torch.bmm(q / math.sqrt(hd), k.transpose(1, 2)).softmax(dim=-1)
        out = torch.bmm(attn, v).transpose(0, 1).contiguous().view(seq, b, dim)
        if self.compat_fp16_out_proj:
            return F.linear(out.half(), self.out_proj.weight.half(), self.out_proj.bias.half())
        return self.out_proj(out)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class TransformerBlock(nn.Module):
    """Pre-LN residual block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (MLP ×4, QuickGELU)."""

    def __init__(self, dim: int, heads: int, compat_fp16_out_proj: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, compat_fp16_out_proj)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("act", QuickGELU())
        self.mlp.add_module("fc2", nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(L, B, D)`` float32 → ``(L, B, D)`` float32."""
        # fp32 + fp16 promotes to fp32, as in the original residual addition.
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


FeatureInput = Union[Tensor, Sequence[Tensor]]


class WeCLIPDecoder(nn.Module):
    """The trainable part of WeCLIP (fusion head + transformer decoder).

    Args:
        in_channels: CLIP width (768 for ViT-B/16).
        num_classes: output classes incl. background (21 VOC / 81 COCO).
        num_layers: number of CLIP block outputs fused (11).
        embed_dim: decoder width (256).
        depth: transformer blocks (3).
        heads: attention heads (8).
        dropout: Dropout2d probability on the fused features (0.1).
        compat_fp16_out_proj: reproduce the official fp16 attention output projection.

    Trainable parameters for ViT-B/16, 21 classes: 5,985,045.
    """

    def __init__(
        self,
        in_channels: int = 768,
        num_classes: int = 21,
        num_layers: int = 11,
        embed_dim: int = 256,
        depth: int = 3,
        heads: int = 8,
        dropout: float = 0.1,
        compat_fp16_out_proj: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.layer_mlps = nn.ModuleList([LayerMLP(in_channels, embed_dim) for _ in range(num_layers)])
        self.fuse = nn.Conv2d(num_layers * embed_dim, embed_dim, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)
        self.blocks = nn.ModuleList([TransformerBlock(embed_dim, heads, compat_fp16_out_proj) for _ in range(depth)])
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    @property
    def compat_fp16_out_proj(self) -> bool:
        """Whether the attention output projections run in fp16 (official numerics)."""
        return all(blk.attn.compat_fp16_out_proj for blk in self.blocks)

    @compat_fp16_out_proj.setter
    def compat_fp16_out_proj(self, value: bool) -> None:
        for blk in self.blocks:
            blk.attn.compat_fp16_out_proj = bool(value)

    def fuse_features(self, features: FeatureInput) -> Tensor:
        """Per-layer MLPs, concatenation, 1×1 fuse conv and Dropout2d.

        Args:
            features: ``(L, B, C, h, w)`` tensor or a sequence of L ``(B, C, h, w)`` tensors (any
                float dtype; computed in float32), L = ``num_layers``.

        Returns:
            ``(B, embed_dim, h, w)`` float32 fused features ``F_u``.
        """
        x = features if isinstance(features, Tensor) else torch.stack(list(features))
        if x.dim() != 5 or x.shape[0] != self.num_layers or x.shape[2] != self.in_channels:
            raise ValueError(
                f"expected features (L={self.num_layers}, B, C={self.in_channels}, h, w), got {tuple(x.shape)}"
            )
        n_layers, b, c, h, w = x.shape
        tokens = x.float().flatten(3).transpose(2, 3).reshape(n_layers, b * h * w, c)  # (L, B*hw, C)
        # All 11 MLPs at once as batched matmuls over the layer axis.
        w1 = torch.stack([m.fc1.weight for m in self.layer_mlps])  # (L, D, C)
        b1 = torch.stack([m.fc1.bias for m in self.layer_mlps])
        w2 = torch.stack([m.fc2.weight for m in self.layer_mlps])
        b2 = torch.stack([m.fc2.bias for m in self.layer_mlps])
        hid = torch.baddbmm(b1.unsqueeze(1), tokens, w1.transpose(1, 2)).relu_()
        out = torch.baddbmm(b2.unsqueeze(1), hid, w2.transpose(1, 2))  # (L, B*hw, D)
        # Channel order of the concatenation: layer-major (layer 0's 256 channels first).
        out = out.view(n_layers, b, h * w, self.embed_dim).permute(1, 0, 3, 2).reshape(b, -1, h, w)
        return self.dropout(self.fuse(out))

    @staticmethod
    def affinity(fused: Tensor) -> Tensor:
        """``sigmoid(F_uᵀ F_u)``: ``(B, D, h, w)`` → ``(B, hw, hw)`` (raw dot products, no scaling)."""
        flat = fused.flatten(2)  # (B, D, hw)
        return torch.sigmoid(torch.bmm(flat.transpose(1, 2), flat))

    def forward(self, features: FeatureInput) -> WeCLIPDecoderOutput:
        """Decode the CLIP block outputs.

        Args:
            features: ``(11, B, C, h, w)`` or a list of 11 ``(B, C, h, w)`` tensors.

        Returns:
            :class:`WeCLIPDecoderOutput` with ``seg_logits (B, num_classes, h, w)``,
            ``affinity (B, hw, hw)`` and ``fused (B, 256, h, w)``, all float32.
        """
        fused = self.fuse_features(features)
        x = self.transform(fused)
        return WeCLIPDecoderOutput(self.classifier(x), self.affinity(fused), fused)

    def transform(self, fused: Tensor) -> Tensor:
        """The transformer blocks on fused features: ``(B, D, h, w)`` -> ``(B, D, h, w)`` (classifier input)."""
        b, d, h, w = fused.shape
        x = fused.flatten(2).permute(2, 0, 1)  # (hw, B, D): sequence-first like CLIP
        for blk in self.blocks:
            x = blk(x)
        return x.permute(1, 2, 0).reshape(b, d, h, w)


def count_trainable_parameters(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (what the WeCLIP optimiser trains)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# Official (prefix-stripped) name pattern → our name; applied in order, first match wins.
_OFFICIAL_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"^linears_modulelist\.(\d+)\.proj\.", r"layer_mlps.\1.fc1."),
    (r"^linears_modulelist\.(\d+)\.proj_2\.", r"layer_mlps.\1.fc2."),
    (r"^linear_fuse\.", r"fuse."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^linear_pred\.", r"classifier."),
)
_OURS_TO_OFFICIAL: tuple[tuple[str, str], ...] = (
    (r"^layer_mlps\.(\d+)\.fc1\.", r"decoder_fts_fuse.linears_modulelist.\1.proj."),
    (r"^layer_mlps\.(\d+)\.fc2\.", r"decoder_fts_fuse.linears_modulelist.\1.proj_2."),
    (r"^fuse\.", r"decoder_fts_fuse.linear_fuse."),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"decoder.transformer.resblocks.\1.attn.in_proj_weight"),
    (r"^blocks\.(\d+)\.attn\.qkv\.bias$", r"decoder.transformer.resblocks.\1.attn.in_proj_bias"),
    (r"^blocks\.(\d+)\.attn\.out_proj\.", r"decoder.transformer.resblocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.norm1\.", r"decoder.transformer.resblocks.\1.ln_1."),
    (r"^blocks\.(\d+)\.norm2\.", r"decoder.transformer.resblocks.\1.ln_2."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"decoder.transformer.resblocks.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"decoder.transformer.resblocks.\1.mlp.c_proj."),
    (r"^classifier\.", r"decoder.linear_pred."),
)
# Parts of a full official checkpoint that are not decoder parameters.
_IGNORED_PREFIXES = ("encoder.", "par.")


def _rename(name: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


def load_official_decoder_state(
    state: Mapping[str, Union[np.ndarray, Tensor]], dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Convert an official WeCLIP decoder state dict to :class:`WeCLIPDecoder` names.

    Accepts the names inside the WeCLIP model (``decoder_fts_fuse.*``, ``decoder.*``), the bare
    module names (prefix stripped), an optional ``module.`` prefix (DataParallel) and a full
    checkpoint (``encoder.*`` CLIP weights and the ``par.*`` buffer are skipped).

    Args:
        state: name → array/tensor (e.g. ``np.load('decoder_state.npz')`` or ``torch.load(ckpt, weights_only=True)``).
        dtype: dtype of the returned tensors (the official checkpoints hold fp32 master weights).

    Returns:
        Our state dict, ready for ``WeCLIPDecoder.load_state_dict``.

    Raises:
        KeyError: for a name that is neither a decoder parameter nor a known non-decoder entry.
    """
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        key = name[len("module.") :] if name.startswith("module.") else name
        if key.startswith(_IGNORED_PREFIXES) or key.endswith("positional_embedding_new"):
            continue
        for prefix in ("decoder_fts_fuse.", "decoder."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        new = _rename(key, _OFFICIAL_TO_OURS)
        if new is None:
            raise KeyError(f"unexpected parameter in the official decoder state: {name!r}")
        tensor = value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))
        out[new] = tensor.detach().to(dtype).clone()
    return out


def to_official_decoder_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`load_official_decoder_state`: our names → names inside the WeCLIP model."""
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        new = _rename(name, _OURS_TO_OFFICIAL)
        if new is None:
            raise KeyError(f"not a WeCLIPDecoder parameter: {name!r}")
        out[new] = value
    return out
