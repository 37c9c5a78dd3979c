"""DINO ViT (Caron et al. 2021) as an extra feature extractor (CorrCLIP's value/scope source).

:class:`DinoViT` is the architecture of ``facebookresearch/dino``'s ``vision_transformer.VisionTransformer``
(what ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb8')`` builds): patch conv, CLS token,
positional embedding interpolated bicubically with DINO's ``(n + 0.1)`` scale factors, pre-LN blocks
(LayerNorm eps 1e-6, exact GELU), final LayerNorm. :func:`load_dino` reads weights safely:

* Meta's released backbone state dict (``dino_vitb8_pretrain.pth``) through ``tag2mask.io.torch_files.safe_torch_load`` (tensors only)
  (a tensors-only dict with a ``teacher`` entry is unwrapped; Meta's *full* training checkpoints pickle
  an ``argparse.Namespace`` and are refused), or the same keys in ``.safetensors``;
* a Hugging Face ``transformers`` ``ViTModel`` folder (``facebook/dino-vitb8``: ``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``), converted to the layout above. The LayerNorm eps is
  DINO's 1e-6 whatever the folder's config says (HF's DINO configs carry ViTConfig's 1e-12; CorrCLIP
  runs the hub model);
* the name ``dino_vitb8`` (or ``dino_vits8``): looked up in the weights cache and downloaded from
  Meta's server only when allowed (``allow_download=True`` / ``TAG2MASK_ALLOW_DOWNLOAD=1``).

Nothing is ever unpickled beyond tensors; a missing or incomplete file raises
:class:`DinoWeightsError` naming what is missing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DinoViT", "DinoWeightsError", "load_dino", "hf_to_dino", "dino_to_hf",
           "DINO_NAMES"]

#: name -> (file name, URL) of Meta's released backbones
DINO_NAMES = {
    "dino_vitb8": ("dino_vitbase8_pretrain.pth",
                   "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "dino_vits8": ("dino_deitsmall8_pretrain.pth",
                   "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
}


class DinoWeightsError(ValueError):
    """DINO weights missing, unreadable or of another layout."""


class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim), _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C)``: ``x + attn(norm1 x)``, then ``+ mlp(norm2 x)`` (exact GELU)."""
        b, n, c = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoViT(nn.Module):
    """DINO's ViT backbone (no head); parameter names are those of Meta's state dict."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int = 8, mlp_ratio: float = 4.0,
                 pretrain_grid: int = 28):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.patch_embed = _PatchEmbed(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid ** 2, embed_dim))
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        g = int(math.isqrt(n))
        if h * w == n and h == w:
            return self.pos_embed
        patch = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        # DINO's interpolate_pos_encoding: scale factors (n + 0.1) / g, no size recomputation
        patch = F.interpolate(patch, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic",
                              recompute_scale_factor=False)
        return torch.cat([self.pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` ImageNet-normalised -> tokens ``(B, 1 + h*w, C)`` and the grid ``(h, w)``."""
        x = self.patch_embed.proj(images)
        b, c, h, w = x.shape
        x = torch.cat([self.cls_token.expand(b, 1, c), x.flatten(2).transpose(1, 2)], dim=1)
        return x + self._pos_embed(h, w), (h, w)

    def last_qk(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """CorrCLIP's DINO feature: ``q + k`` of the last block's qkv projection (heads concatenated),
        CLS dropped: ``(B, 3, H, W)`` -> ``((B, h*w, C), (h, w))`` (not normalised)."""
        x, grid = self.embed(images)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        q, k, _ = last.attn.qkv(last.norm1(x)).chunk(3, dim=-1)
        return (q + k)[:, 1:], grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens ``(B, 1 + h*w, C)``."""
        x, _ = self.embed(images)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


_HF_BLOCK = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
             "layernorm_before": "norm1", "layernorm_after": "norm2"}


def hf_to_dino(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``transformers`` ``ViTModel`` state dict -> Meta's DINO layout (q/k/v fused into ``qkv``)."""
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    need = ["embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise DinoWeightsError(f"not a transformers ViTModel state dict: missing {missing}")
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[f"{p}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
            for hf, meta in _HF_BLOCK.items():
                out[f"blocks.{i}.{meta}.{kind}"] = sd[f"{p}{hf}.{kind}"]
    return out


def dino_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's DINO layout -> ``transformers`` ``ViTModel`` keys (inverse of :func:`hf_to_dino`)."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for n, part in zip(("query", "key", "value"), sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)):
                out[f"{p}attention.attention.{n}.{kind}"] = part.clone()
            for hf, meta in _HF_BLOCK.items():
                out[f"{p}{hf}.{kind}"] = sd[f"blocks.{i}.{meta}.{kind}"]
    return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from tag2mask.io.torch_files import UnreadableFileError, UnsafeFileError, safe_torch_load

    try:  # tensors only (weights_only); pickled objects and TorchScript are refused in one line
        obj = safe_torch_load(path, what="DINO weights")
    except (UnsafeFileError, UnreadableFileError) as e:
        raise DinoWeightsError(f"cannot read DINO weights as a tensor state dict: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):  # a full DINO training checkpoint
        obj = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj["teacher"].items()}
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise DinoWeightsError(f"{path}: not a state dict of tensors")
    return obj


def _read_hf_folder(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return hf_to_dino(_read_tensors(folder / name))
    raise DinoWeightsError(f"{folder}: a transformers folder needs model.safetensors or pytorch_model.bin")


def _resolve(source: Union[str, os.PathLike], allow_download: Optional[bool]) -> Path:
    from tag2mask.clip.loading import default_cache_dir, downloads_allowed

    path = Path(source).expanduser()
    if path.exists() or str(source) not in DINO_NAMES:
        if not path.exists():
            raise DinoWeightsError(f"{source}: no such DINO weights file or folder (give Meta's "
                                   f"dino_vitbase8_pretrain.pth, a facebook/dino-vitb8 folder, or a name of "
                                   f"{sorted(DINO_NAMES)})")
        return path
    filename, url = DINO_NAMES[str(source)]
    target = default_cache_dir() / filename
    if target.exists():
        return target
    if not downloads_allowed(allow_download):
        raise DinoWeightsError(f"DINO weights {source!r} are not on this machine (looked for {target}); pass the "
                               f"file with --dino, put it there, or allow a download from {url} with --allow-download")
    return _download_unverified(url, target)


def _download_unverified(url: str, target: Path) -> Path:
    """Download to ``target.part`` then rename (Meta publishes no checksum; the file is read tensors-only)."""
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DinoWeightsError(f"could not download {url}: {e}; pass the file with --dino") from e
    os.replace(tmp, target)
    return target


def load_dino(source: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
              allow_download: Optional[bool] = None, num_heads: Optional[int] = None) -> DinoViT:
    """Build a :class:`DinoViT` from a file, a ``transformers`` folder or a name; eval mode, frozen.

    The architecture (width, depth, patch size, pre-training grid) is read off the weights, the
    number of heads from ``num_heads``, a ``transformers`` config or DINO's 64-dim rule; loading is
    strict (a classifier ``head`` is dropped). Raises :class:`DinoWeightsError` with what is missing.
    """
    path = _resolve(source, allow_download)
    sd = _read_hf_folder(path) if path.is_dir() else _read_tensors(path)
    if any(k.startswith(("embeddings.", "vit.embeddings.")) for k in sd):
        sd = hf_to_dino(sd)
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise DinoWeightsError(f"{path}: not DINO ViT weights, missing {missing}")
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = _heads_of(path, width, num_heads)
    grid = int(math.isqrt(sd["pos_embed"].shape[1] - 1))
    model = DinoViT(width, depth, heads, patch, sd["blocks.0.mlp.fc1.weight"].shape[0] / width, grid)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items() if not k.startswith("head.")}, strict=True)
    except RuntimeError as e:
        raise DinoWeightsError(f"{path}: DINO weights do not fit the architecture: {e}") from e
    from tag2mask.clip.loading import file_fingerprint

    model.source_path = str(path)
    model.fingerprint = file_fingerprint(path)  # sha256 prefix of the file (or folder): the settings guard uses it
    return model.requires_grad_(False).to(device).eval()


def _heads_of(path: Path, width: int, num_heads: Optional[int]) -> int:
    """Attention heads: given, else from a ``transformers`` config, else DINO's 64-dim heads (ViT-S 6, ViT-B 12)."""
    if num_heads is not None:
        return int(num_heads)
    if path.is_dir() and (path / "config.json").is_file():
        from tag2mask.io.json_files import read_json

        config = read_json(path / "config.json")
        heads = config.get("num_attention_heads") if isinstance(config, dict) else None
        if heads:
            return int(heads)
    if width % 64:
        raise DinoWeightsError(f"{path}: cannot tell the number of attention heads of a width-{width} DINO "
                               "(Meta's files do not record it); give num_heads (--dino-heads)")
    return width // 64
