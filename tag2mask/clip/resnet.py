"""CLIP's ModifiedResNet image tower (RN50, RN101, RN50x4/x16/x64) in OpenAI's parameter layout.

Differences from torchvision's ResNet that CLIP relies on: a 3-convolution stem with an average
pool, anti-aliased strided blocks (avg-pool before the strided 1x1 convolution), and a final
attention pool instead of global average pooling. MaskCLIP's dense path uses the attention pool's
v/c projections as 1x1 convolutions (see :meth:`AttentionPool2d.dense_values`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention pooling of a feature map with the spatial mean as the query token."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, D). Requires the pretraining grid size (positional embedding is not resized)."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        if tokens.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"attention pool expects a {int((self.positional_embedding.shape[0] - 1) ** 0.5)}^2 grid, got {h}x{w}; "
                "use dense_values() for other sizes"
            )
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        heads = self.num_heads
        d = c // heads
        q = self.q_proj(tokens[:, :1]).view(b, 1, heads, d).transpose(1, 2)
        k = self.k_proj(tokens).view(b, -1, heads, d).transpose(1, 2)
        v = self.v_proj(tokens).view(b, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(out.transpose(1, 2).reshape(b, c))

    def dense_values(self, x: torch.Tensor) -> torch.Tensor:
        """MaskCLIP's dense features ``c_proj(v_proj(x))`` per position, no positional embedding.

        (B, C, h, w) -> (B, D, h, w).
        """
        tokens = x.flatten(2).transpose(1, 2)
        out = self.c_proj(self.v_proj(tokens))
        b, _, h, w = x.shape
        return out.transpose(1, 2).reshape(b, -1, h, w)

    def dense_keys(self, x: torch.Tensor) -> torch.Tensor:
        """``k_proj(x)`` per position (B, h*w, C), used by MaskCLIP's key smoothing."""
        return self.k_proj(x.flatten(2).transpose(1, 2))


class ModifiedResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int, width: int):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem + the four stages: (B, 3, H, W) -> (B, 32*width, H/32, W/32)."""
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """MaskCLIP dense features: (B, 3, H, W) -> ((B, h*w, D), (h, w))."""
        feats = self.attnpool.dense_values(self.forward_features(images))
        b, d, h, w = feats.shape
        return feats.flatten(2).transpose(1, 2), (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.forward_features(x))
