"""A tiny random Hugging Face ``SamModel`` (about 9k parameters, 64-pixel input) for tests."""

from __future__ import annotations

import torch


def tiny_sam_config():
    from transformers import SamConfig

    return SamConfig(
        vision_config=dict(hidden_size=8, output_channels=8, num_hidden_layers=1, num_attention_heads=1,
                           image_size=64, patch_size=16, window_size=2, global_attn_indexes=(0,),
                           num_pos_feats=4, mlp_dim=8),
        prompt_encoder_config=dict(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=2),
        mask_decoder_config=dict(hidden_size=8, mlp_dim=8, num_hidden_layers=1, num_attention_heads=1,
                                 iou_head_hidden_dim=8, iou_head_depth=2),
    )


def tiny_sam(seed: int = 0):
    from transformers import SamModel

    torch.manual_seed(seed)
    return SamModel(tiny_sam_config()).eval()


class DiskSam(torch.nn.Module):
    """A stand-in with ``SamModel``'s interface whose masks are known: for every point prompt, three
    disks around the point (levels 0/1/2 = radius ``radii`` in low-resolution mask pixels) with
    predicted IoUs ``ious`` (minus a tiny per-point amount, so that NMS orders are strict).

    Logits are ``sharpness * (radius - distance)``, so stability scores are high. It lets the
    generator's logic (levels, offsets, crops, NMS, filters) be checked against geometry.
    """

    def __init__(self, image_size: int = 64, radii=(1.5, 3.0, 6.0), ious=(0.9, 0.8, 0.8), sharpness: float = 50.0):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=image_size))
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.radii = torch.tensor(radii)
        self.ious = torch.tensor(ious)
        self.sharpness = sharpness
        self.low_res = image_size // 4

    def get_image_embeddings(self, pixel_values):
        return pixel_values.new_zeros(pixel_values.shape[0], 1, 1, 1)

    def forward(self, image_embeddings, input_points, input_labels, multimask_output=True):
        from types import SimpleNamespace

        pts = input_points[0, :, 0, :] / 4.0  # (n, 2) in low-res pixels
        coords = torch.arange(self.low_res, dtype=torch.float) + 0.5
        dx = coords[None, None, :] - pts[:, 0, None, None]
        dy = coords[None, :, None] - pts[:, 1, None, None]
        dist = torch.sqrt(dx**2 + dy**2)  # (n, h, w)
        logits = self.sharpness * (self.radii[None, :, None, None] - dist[:, None])  # (n, 3, h, w)
        jitter = 1e-6 * (pts[:, 0] + 7.3 * pts[:, 1])[:, None]  # depends on the point only
        iou = self.ious[None, :] - jitter
        return SimpleNamespace(pred_masks=logits[None], iou_scores=iou[None])
