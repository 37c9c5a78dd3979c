"""Dilated ResNet backbones in plain PyTorch, and the ImageNet checkpoints they load.

Three published flavours, chosen by ``style``:

=============== ================================ ================= ============================
style           stem                             stride in         max-pool
=============== ================================ ================= ============================
``torchvision`` 7×7/2 conv (``conv1``, ``bn1``)  the 3×3 conv      3/2/1, floor
``caffe``       7×7/2 conv                       the first 1×1     3/2/1, **ceil** (MSRA/DeepLab)
``v1c``         three 3×3 convs (``stem.*``)     the 3×3 conv      3/2/1, floor (mmseg ResNetV1c)
=============== ================================ ================= ============================

Module names follow torchvision (``layer1.0.conv1``, ``downsample.0`` ...) and mmcv for the deep
stem, so those checkpoints load without renaming. Checkpoint layouts understood by
:func:`load_resnet_checkpoint` (read with ``weights_only=True`` or safetensors):

* torchvision ``resnet{50,101}-*.pth`` (``fc.*`` dropped);
* mmcv / mmseg ``resnet{50,101}_v1c-*.pth`` (``stem.*``; a ``backbone.`` prefix is stripped);
* ``transformers`` ResNets (``microsoft/resnet-101``: a ``save_pretrained`` folder or its
  ``model.safetensors``; ``embedder.*`` / ``encoder.stages.*``, stride on the 3×3 conv, so they
  build the ``torchvision`` style);
* deeplab-pytorch's Caffe conversions (``deeplabv1_resnet101-coco.pth``, the COCO init CLIP-ES uses,
  and ``deeplabv2_resnet101_msc-vocaug.pth``): ``layer1.conv1.conv``, ``layer{2..5}.block{i}.
  {reduce,conv3x3,increase,shortcut}.{conv,bn}``, optional ``base.`` prefix and ``aspp.c{i}``. The
  first convolution is flipped from BGR to RGB on load (see ``CAFFE_NORMALIZATION``).

Output stride: 8 (strides 1,2,1,1; dilations 1,1,2,4), 16 (1,2,2,1; 1,1,1,2) or 32. With
``contract_dilation`` the first block of a dilated stage uses half the dilation (mmseg, torchvision);
DeepLab-v2 (deeplab-pytorch) does not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from tag2mask.clip.loading import WeightsError, WeightsNotFoundError
from tag2mask.io.torch_files import UnreadableFileError, UnsafeFileError, clean_message, safe_torch_load

__all__ = [
    "RESNET_DEPTHS",
    "STYLES",
    "DilatedResNet",
    "stage_strides_dilations",
    "read_checkpoint",
    "detect_layout",
    "caffe_to_torchvision_names",
    "transformers_to_torchvision_names",
    "load_resnet_checkpoint",
]

#: stage depths of the variants (``tiny``: one block per stage, for tests)
RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3), "tiny": (1, 1, 1, 1)}
STYLES = ("torchvision", "caffe", "v1c")
_EXPANSION = 4


def stage_strides_dilations(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides and dilations of the four stages for an output stride of 8, 16 or 32."""
    table = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2)), 32: ((1, 2, 2, 2), (1, 1, 1, 1))}
    if output_stride not in table:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return table[output_stride]


class Bottleneck(nn.Module):
    """1×1 → 3×3 (dilated) → 1×1 bottleneck with BN; the stride sits on the 3×3 or (Caffe) the first 1×1."""

    def __init__(self, in_ch: int, mid_ch: int, stride: int, dilation: int, stride_in_1x1: bool) -> None:
        super().__init__()
        out_ch = mid_ch * _EXPANSION
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class DilatedResNet(nn.Module):
    """ResNet trunk returning the four stage outputs (strides 4, 8, then per ``output_stride``).

    Args:
        depths: blocks per stage, e.g. ``(3, 4, 23, 3)`` for ResNet-101.
        style: ``torchvision`` | ``caffe`` | ``v1c`` (see the module docstring).
        output_stride: 8, 16 or 32.
        contract_dilation: first block of a dilated stage at half the dilation.
        base_width: width of the first stage's bottleneck (64; smaller for test models).
        norm_eval: keep every BatchNorm in eval mode with frozen affine parameters (DeepLab-v2's
            ``freeze_bn``: statistics and scales stay those of the ImageNet/COCO init).
    """

    def __init__(
        self,
        depths: Sequence[int],
        style: str = "torchvision",
        output_stride: int = 8,
        contract_dilation: bool = False,
        base_width: int = 64,
        norm_eval: bool = False,
    ) -> None:
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"ResNet style must be one of {STYLES}, got {style!r}")
        self.style = style
        self.norm_eval = norm_eval
        stem_out = base_width
        if style == "v1c":
            half = stem_out // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                nn.Conv2d(half, stem_out, 3, padding=1, bias=False), nn.BatchNorm2d(stem_out), nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_out, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_out)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=style == "caffe")
        strides, dilations = stage_strides_dilations(output_stride)
        in_ch = stem_out
        self.out_channels: list[int] = []
        for i, (n, s, d) in enumerate(zip(depths, strides, dilations)):
            mid = base_width * 2**i
            blocks = []
            for j in range(n):
                dil = d // 2 if (j == 0 and contract_dilation and d > 1) else d
                blocks.append(Bottleneck(in_ch, mid, s if j == 0 else 1, dil, stride_in_1x1=style == "caffe"))
                in_ch = mid * _EXPANSION
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_ch)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    def train(self, mode: bool = True) -> "DilatedResNet":
        super().train(mode)
        if self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> four ``(B, C_i, H_i, W_i)`` stage outputs."""
        x = self.stem(x) if self.style == "v1c" else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


# ------------------------------------------------------------------------------------------------
# checkpoints

_STRIP_PREFIXES = ("module.", "backbone.", "base.", "resnet.")


def _weights_in_folder(folder: Path) -> Path:
    """The weight file of a ``transformers`` ResNet folder (checked to be a bottleneck ResNet, v1.5)."""

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{folder}: a folder without config.json; pass a weight file or a transformers ResNet folder")
    from tag2mask.io.json_files import read_json

    config = read_json(config_file)
    if not isinstance(config, dict):
        raise WeightsError(f"{config_file}: not a JSON object")
    if config.get("model_type") != "resnet" or config.get("layer_type", "bottleneck") != "bottleneck":
        raise WeightsError(f"{folder}: not a transformers bottleneck ResNet (model_type {config.get('model_type')!r})")
    if config.get("downsample_in_bottleneck") or config.get("downsample_in_first_stage"):
        raise WeightsError(f"{folder}: a ResNet with the stride on the first 1×1 conv or in the first stage is not supported")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def read_checkpoint(path: Union[str, Path]) -> dict[str, Tensor]:
    """Read a weight file (or ``transformers`` folder) into a flat state dict.

    ``.safetensors`` or ``torch.load(weights_only=True)``; ``state_dict`` / ``model`` wrappers and the
    prefixes ``module.``, ``backbone.``, ``base.``, ``resnet.`` are removed.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = _weights_in_folder(p)
    if not p.is_file():
        raise WeightsNotFoundError(f"{p}: no such checkpoint file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = safe_torch_load(p, "weight file")
    except (UnsafeFileError, UnreadableFileError) as e:
        raise WeightsError(str(e)) from None
    except Exception as e:  # bad safetensors header
        detail = clean_message(str(e))
        raise WeightsError(f"{p}: not a readable weight file ({type(e).__name__}{': ' + detail if detail else ''})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: does not hold a state dict of tensors")
    out = {}
    for k, v in obj.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix) :], True
        out[k] = v
    return out


def detect_layout(sd: dict[str, Tensor]) -> Optional[str]:
    """``torchvision`` | ``caffe`` | ``v1c`` | ``transformers`` for a (prefix-stripped) ResNet state dict, or ``None``."""
    if "layer1.conv1.conv.weight" in sd and any(k.startswith("layer2.block1.") for k in sd):
        return "caffe"
    if "embedder.embedder.convolution.weight" in sd and any(k.startswith("encoder.stages.") for k in sd):
        return "transformers"
    if "stem.0.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "v1c"
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "torchvision"
    return None


_CAFFE_BRANCH = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"), "shortcut": ("downsample.0", "downsample.1")}


def caffe_to_torchvision_names(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """deeplab-pytorch names -> ours: ``(backbone state dict, {'c0.weight': ..} of the ASPP if present})``.

    ``layer1.conv1.{conv,bn}`` is the stem; deeplab-pytorch's ``layer{s}.block{b}`` is torchvision's
    ``layer{s-1}.{b-1}``. The stem convolution is flipped from BGR to RGB input channels.
    """
    backbone: dict[str, Tensor] = {}
    aspp: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("aspp."):
            aspp[key[len("aspp.") :]] = value
            continue
        m = re.match(r"^layer1\.conv1\.(conv|bn)\.(.+)$", key)
        if m:
            name = ("conv1." if m.group(1) == "conv" else "bn1.") + m.group(2)
            if name == "conv1.weight":
                value = value.flip(1)  # BGR -> RGB
            backbone[name] = value
            continue
        m = re.match(r"^layer(\d)\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(.+)$", key)
        if m:
            stage, block, branch, kind, param = int(m.group(1)) - 1, int(m.group(2)) - 1, m.group(3), m.group(4), m.group(5)
            conv_name, bn_name = _CAFFE_BRANCH[branch]
            backbone[f"layer{stage}.{block}.{conv_name if kind == 'conv' else bn_name}.{param}"] = value
            continue
        if key.startswith(("fc.", "layer1.pool")):
            continue
        raise WeightsError(f"unexpected entry {key!r} in a deeplab-pytorch (Caffe) ResNet checkpoint")
    return backbone, aspp


def transformers_to_torchvision_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``transformers`` ResNet names -> torchvision's (``classifier.*`` dropped)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$", key)
        if m:
            out[("conv1." if m.group(1) == "convolution" else "bn1.") + m.group(2)] = value
            continue
        m = re.match(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d))\.(convolution|normalization)\.(.+)$", key)
        if m:
            stage, block, part, index, kind, param = m.groups()
            prefix = f"layer{int(stage) + 1}.{block}"
            if part == "shortcut":
                name = f"{prefix}.downsample.{0 if kind == 'convolution' else 1}"
            else:
                name = f"{prefix}.{'conv' if kind == 'convolution' else 'bn'}{int(index) + 1}"
            out[f"{name}.{param}"] = value
            continue
        if key.startswith("classifier."):
            continue
        raise WeightsError(f"unexpected entry {key!r} in a transformers ResNet checkpoint")
    return out


def load_resnet_checkpoint(model: DilatedResNet, sd: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Load an ImageNet/COCO ResNet state dict (already read, prefix-stripped) into ``model``.

    Returns any extra head weights found in the file (deeplab-pytorch ``aspp`` entries, named
    ``c{i}.weight`` / ``c{i}.bias``). Raises :class:`WeightsError` naming ``source`` when the layout
    is unknown, does not match ``model.style``, or keys/shapes disagree (e.g. ResNet-50 vs -101).
    """
    layout = detect_layout(sd)
    if layout is None:
        sample = sorted(sd)[:6]
        raise WeightsError(
            f"{source}: unknown ResNet checkpoint layout (first keys {sample}); expected torchvision "
            f"'resnet101-*.pth', mmcv 'resnet101_v1c-*.pth' or deeplab-pytorch 'deeplabv1_resnet101-coco.pth'"
        )
    expected_style = "torchvision" if layout == "transformers" else layout
    if expected_style != model.style:
        raise WeightsError(f"{source}: a {layout}-style ResNet checkpoint, but the backbone was built as {model.style!r}; "
                           f"use backbone_style='{expected_style}' (or 'auto')")
    extra: dict[str, Tensor] = {}
    if layout == "caffe":
        sd, extra = caffe_to_torchvision_names(sd)
    elif layout == "transformers":
        sd = transformers_to_torchvision_names(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        raise WeightsError(
            f"{source}: does not match a {model.style} ResNet with stage depths "
            f"{tuple(len(getattr(model, f'layer{i}')) for i in range(1, 5))}; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise WeightsError(f"{source}: shape mismatch for {bad[:5]} (a different ResNet width?)")
    merged = {k: sd.get(k, own[k]).to(own[k].dtype) for k in own}
    model.load_state_dict(merged)
    return extra
