"""ResNet checkpoints: torchvision, mmcv v1c and deeplab-pytorch (Caffe) layouts, read safely.

The Caffe case is checked numerically: a functional re-statement of deeplab-pytorch's DeepLab-v2
(stride on the first 1×1 conv, ceil-mode max-pool, dilations 2/4 without contraction, ASPP sum,
BGR mean-subtracted 0..255 input) runs on the file's tensors under their own names and must give
the logits our network gives on the RGB image with ``CAFFE_NORMALIZATION``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tag2mask.clip.loading import WeightsError
from tag2mask.models import CAFFE_NORMALIZATION, IMAGENET_NORMALIZATION, build_segmenter

DEPTHS = (1, 1, 1, 1)  # the 'tiny' variant
WIDTH = 8


def _bn(prefix: str, ch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(ch, generator=g) + 0.5,
        f"{prefix}.bias": torch.randn(ch, generator=g) * 0.1,
        f"{prefix}.running_mean": torch.randn(ch, generator=g) * 0.1,
        f"{prefix}.running_var": torch.rand(ch, generator=g) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(0),
    }


def _conv(name: str, out_ch: int, in_ch: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(out_ch, in_ch, k, k, generator=g) * (2.0 / (in_ch * k * k)) ** 0.5}


def torchvision_state(depths=DEPTHS, width=WIDTH, seed=0, deep_stem=False) -> dict[str, torch.Tensor]:
    """Names and shapes as torchvision's ``resnet*`` (or mmcv's ResNetV1c with ``deep_stem``)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    if deep_stem:
        half = width // 2
        sd.update(_conv("stem.0.weight", half, 3, 3, g)); sd.update(_bn("stem.1", half, g))
        sd.update(_conv("stem.3.weight", half, half, 3, g)); sd.update(_bn("stem.4", half, g))
        sd.update(_conv("stem.6.weight", width, half, 3, g)); sd.update(_bn("stem.7", width, g))
    else:
        sd.update(_conv("conv1.weight", width, 3, 7, g)); sd.update(_bn("bn1", width, g))
    in_ch = width
    for s, n in enumerate(depths):
        mid = width * 2**s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            sd.update(_conv(f"{p}.conv1.weight", mid, in_ch, 1, g)); sd.update(_bn(f"{p}.bn1", mid, g))
            sd.update(_conv(f"{p}.conv2.weight", mid, mid, 3, g)); sd.update(_bn(f"{p}.bn2", mid, g))
            sd.update(_conv(f"{p}.conv3.weight", 4 * mid, mid, 1, g)); sd.update(_bn(f"{p}.bn3", 4 * mid, g))
            if b == 0:
                sd.update(_conv(f"{p}.downsample.0.weight", 4 * mid, in_ch, 1, g)); sd.update(_bn(f"{p}.downsample.1", 4 * mid, g))
            in_ch = 4 * mid
    sd["fc.weight"] = torch.randn(10, in_ch, generator=g)
    sd["fc.bias"] = torch.randn(10, generator=g)
    return sd


def caffe_state(num_classes: int, depths=DEPTHS, width=WIDTH, seed=0) -> dict[str, torch.Tensor]:
    """Names as deeplab-pytorch's converted Caffe DeepLab-v2 (MSC-wrapped: ``base.`` prefix)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    sd.update(_conv("layer1.conv1.conv.weight", width, 3, 7, g)); sd.update(_bn("layer1.conv1.bn", width, g))
    in_ch = width
    for s, n in enumerate(depths):
        mid = width * 2**s
        for b in range(n):
            p = f"layer{s + 2}.block{b + 1}"
            sd.update(_conv(f"{p}.reduce.conv.weight", mid, in_ch, 1, g)); sd.update(_bn(f"{p}.reduce.bn", mid, g))
            sd.update(_conv(f"{p}.conv3x3.conv.weight", mid, mid, 3, g)); sd.update(_bn(f"{p}.conv3x3.bn", mid, g))
            sd.update(_conv(f"{p}.increase.conv.weight", 4 * mid, mid, 1, g)); sd.update(_bn(f"{p}.increase.bn", 4 * mid, g))
            if b == 0:
                sd.update(_conv(f"{p}.shortcut.conv.weight", 4 * mid, in_ch, 1, g)); sd.update(_bn(f"{p}.shortcut.bn", 4 * mid, g))
            in_ch = 4 * mid
    for i in range(4):
        sd[f"aspp.c{i}.weight"] = torch.randn(num_classes, in_ch, 3, 3, generator=g) * 0.01
        sd[f"aspp.c{i}.bias"] = torch.randn(num_classes, generator=g) * 0.1
    return {f"base.{k}": v for k, v in sd.items()}


def deeplab_pytorch_reference(sd: dict[str, torch.Tensor], bgr: torch.Tensor, depths=DEPTHS) -> torch.Tensor:
    """deeplab-pytorch's DeepLabV2 forward on its own parameter names (eval-mode BN)."""
    sd = {k[len("base."):]: v for k, v in sd.items()}

    def cbr(x, p, stride=1, pad=0, dil=1, relu=True):
        x = F.conv2d(x, sd[f"{p}.conv.weight"], stride=stride, padding=pad, dilation=dil)
        x = F.batch_norm(x, sd[f"{p}.bn.running_mean"], sd[f"{p}.bn.running_var"], sd[f"{p}.bn.weight"],
                         sd[f"{p}.bn.bias"], False, 0.0, 1e-5)
        return F.relu(x) if relu else x

    x = cbr(bgr, "layer1.conv1", stride=2, pad=3)
    x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
    stage_stride, stage_dil = (1, 2, 1, 1), (1, 1, 2, 4)
    for s, n in enumerate(depths):
        for b in range(n):
            p = f"layer{s + 2}.block{b + 1}"
            stride = stage_stride[s] if b == 0 else 1
            d = stage_dil[s]
            h = cbr(x, f"{p}.reduce", stride=stride)
            h = cbr(h, f"{p}.conv3x3", pad=d, dil=d)
            h = cbr(h, f"{p}.increase", relu=False)
            short = cbr(x, f"{p}.shortcut", stride=stride, relu=False) if b == 0 else x
            x = F.relu(h + short)
    return sum(F.conv2d(x, sd[f"aspp.c{i}.weight"], sd[f"aspp.c{i}.bias"], padding=r, dilation=r)
               for i, r in enumerate((6, 12, 18, 24)))


def test_caffe_deeplab_checkpoint_matches_deeplab_pytorch(tmp_path):
    sd = caffe_state(num_classes=6)
    path = tmp_path / "deeplabv2_resnet101_msc-vocaug.pth"
    torch.save(sd, path)
    model = build_segmenter("deeplab-v2", 6, variant="tiny", pretrained=str(path)).eval()
    assert model.config.backbone_style == "caffe" and model.normalization == CAFFE_NORMALIZATION
    g = torch.Generator().manual_seed(5)
    rgb = torch.rand(1, 3, 44, 40, generator=g)  # sizes where ceil-mode pooling adds a row and a column
    bgr255 = rgb.flip(1) * 255 - torch.tensor([104.008, 116.669, 122.675]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = deeplab_pytorch_reference(sd, bgr255)
        got = model(model.normalization(rgb))
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    # a different class count: the backbone loads, the ASPP keeps its N(0, 0.01) init
    other = build_segmenter("deeplab-v2", 3, variant="tiny", pretrained=str(path))
    assert torch.equal(other.backbone.layer1[0].conv2.weight, sd["base.layer2.block1.conv3x3.conv.weight"])
    assert torch.equal(other.backbone.conv1.weight, sd["base.layer1.conv1.conv.weight"].flip(1))  # BGR -> RGB


def test_torchvision_checkpoint(tmp_path):
    sd = torchvision_state()
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(sd, path)
    model = build_segmenter("deeplab-v3plus", 4, variant="tiny", pretrained=str(path))
    assert model.config.backbone_style == "torchvision" and model.normalization == IMAGENET_NORMALIZATION
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith("fc."))
    # stride on the 3×3 conv, floor-mode pooling
    assert model.backbone.layer2[0].conv2.stride == (2, 2) and model.backbone.layer2[0].conv1.stride == (1, 1)
    assert not model.backbone.maxpool.ceil_mode


def test_mmcv_v1c_checkpoint_with_wrapper_and_prefix(tmp_path):
    sd = torchvision_state(deep_stem=True)
    path = tmp_path / "resnet101_v1c.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": {f"backbone.{k}": v for k, v in sd.items()}}, path)
    model = build_segmenter("deeplab-v2", 4, variant="tiny", aspp="bn", pretrained=str(path))
    assert model.config.backbone_style == "v1c"
    assert torch.equal(model.backbone.stem[6].weight, sd["stem.6.weight"])


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v for k, v in torchvision_state(seed=2).items()}
    save_file(sd, str(tmp_path / "r.safetensors"))
    model = build_segmenter("deeplab-v2", 4, variant="tiny", pretrained=str(tmp_path / "r.safetensors"))
    assert torch.equal(model.backbone.layer4[0].conv3.weight, sd["layer4.0.conv3.weight"])


def test_wrong_or_unsafe_checkpoints_are_refused_with_the_file_named(tmp_path):
    deeper = torchvision_state(depths=(2, 1, 1, 1))
    torch.save(deeper, tmp_path / "resnet_deeper.pth")
    with pytest.raises(WeightsError, match=r"resnet_deeper.pth.*unexpected \['layer1.1"):
        build_segmenter("deeplab-v2", 4, variant="tiny", pretrained=str(tmp_path / "resnet_deeper.pth"))
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="other.pth: unknown ResNet checkpoint layout"):
        build_segmenter("deeplab-v2", 4, variant="tiny", pretrained=str(tmp_path / "other.pth"))
    torch.save(torchvision_state(), tmp_path / "tv.pth")
    with pytest.raises(WeightsError, match="backbone_style='torchvision'"):
        build_segmenter("deeplab-v2", 4, variant="tiny", backbone_style="caffe", pretrained=str(tmp_path / "tv.pth"))
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a module object: needs full unpickling
    with pytest.raises(WeightsError, match="pickled.pth: refused: .*Linear"):
        build_segmenter("deeplab-v2", 4, variant="tiny", pretrained=str(tmp_path / "pickled.pth"))
    with pytest.raises(WeightsError, match="no such checkpoint"):
        build_segmenter("deeplab-v2", 4, variant="tiny", pretrained=str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("output_stride,contract", [(8, False), (8, True), (16, True)])
def test_output_stride_and_dilations(output_stride, contract):
    model = build_segmenter("deeplab-v2", 3, variant="tiny", output_stride=output_stride, contract_dilation=contract)
    out = model.backbone(torch.randn(1, 3, 64, 64))
    assert out[-1].shape[-1] == 64 // output_stride
    last = model.backbone.layer4
    full = 4 if output_stride == 8 else 2
    assert last[0].conv2.dilation == ((full // 2,) * 2 if contract else (full,) * 2)


def test_transformers_resnet_folder_matches_its_backbone(tmp_path):
    from transformers import ResNetBackbone, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(6)
    cfg = ResNetConfig(embedding_size=WIDTH, hidden_sizes=[4 * WIDTH * 2**i for i in range(4)], depths=list(DEPTHS),
                       layer_type="bottleneck", num_labels=3)
    clf = ResNetForImageClassification(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in clf.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    clf.save_pretrained(tmp_path / "resnet")
    model = build_segmenter("deeplab-v2", 3, variant="tiny", output_stride=32, pretrained=str(tmp_path / "resnet")).eval()
    assert model.config.backbone_style == "torchvision"
    reference = ResNetBackbone.from_pretrained(str(tmp_path / "resnet"), out_features=["stage1", "stage2", "stage3", "stage4"]).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ours = model.backbone(x)
        theirs = reference(x).feature_maps
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)
    (tmp_path / "notresnet").mkdir()
    (tmp_path / "notresnet" / "config.json").write_text('{"model_type": "swin"}')
    with pytest.raises(WeightsError, match="not a transformers bottleneck ResNet"):
        build_segmenter("deeplab-v2", 3, variant="tiny", pretrained=str(tmp_path / "notresnet"))
