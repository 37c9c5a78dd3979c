"""Contact sheets for eyeballing generated scenes: image tiles with their colourised GT mask."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

from tag2mask.synth.export import voc_palette
from tag2mask.synth.scenes import SceneSample

_PALETTE = voc_palette(256)


def contact_sheet(samples: Sequence[SceneSample], cols: int = 4, with_masks: bool = True) -> Image.Image:
    """Grid of samples; each cell is the image (and, right of it, the VOC-coloured mask) plus its labels.

    Returns an RGB PIL image of width ``cols * W * (2 if with_masks else 1)``.
    """
    if not samples:
        raise ValueError("contact_sheet needs at least one sample")
    h, w = samples[0].mask.shape
    text_h = 14
    cell_w = w * (2 if with_masks else 1)
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * (h + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, s in enumerate(samples):
        x, y = (k % cols) * cell_w, (k // cols) * (h + text_h)
        sheet.paste(Image.fromarray(s.image), (x, y))
        if with_masks:
            sheet.paste(Image.fromarray(_PALETTE[s.mask]), (x + w, y))
        draw.text((x + 2, y + h + 1), f"{', '.join(s.label_names)} / {s.stuff}", fill=(0, 0, 0))
    return sheet
