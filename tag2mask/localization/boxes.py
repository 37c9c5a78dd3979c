"""CAM -> bounding-box mask, reproducing CLIP-ES's ``scoremap2bbox`` without OpenCV.

The official code thresholds an 8-bit version of the CAM, traces *all* contours
(``cv2.findContours`` with ``RETR_TREE``: outer borders of the 8-connected
foreground components and the borders of their holes) and fills every contour's
bounding rectangle. Here:

* outer contour box = bounding box of an 8-connected component
  (``scipy.ndimage.label`` with a 3x3 structure + ``find_objects``);
* hole contour box = bounding box of a 4-connected background region that does
  not reach the image frame, grown by one pixel on every side (the hole's border
  consists of the foreground pixels 4-adjacent to it);
* the official clipping quirk: ``x1 = min(x + bw, w - 1)``, ``y1 = min(y + bh, h - 1)``
  are then used as *exclusive* ends, so a box touching the right/bottom border
  loses its last column/row (a one-pixel blob on that border gives an empty box).

Hole boxes never extend their component's box, so the mask equals the union of
component boxes; they are computed only so that the returned box *list* equals
the official one (as a multiset: the order of the official list follows
OpenCV's contour tree and is not reproduced).
"""

from __future__ import annotations

from typing import List, Tuple, TypeVar, Union

import numpy as np
import torch
from scipy import ndimage

__all__ = ["cam_box_mask", "cam_box_masks", "cam_to_uint8"]

Box = Tuple[int, int, int, int]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity for the foreground
_FOUR = ndimage.generate_binary_structure(2, 1)  # 4-connectivity for the background


def _to_numpy(x: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cam_to_uint8(cam: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """``uint8(cam * 255)`` with truncation toward zero, as the official code.

    The product is formed in float32 (``cam`` is float32 in CLIP-ES). Values are
    clipped to ``[0, 255]`` first so that out-of-range inputs do not hit
    platform-dependent float->uint8 casts; in-range values are unaffected.

    Args:
        cam: ``(h, w)`` float map in ``[0, 1]``.

    Returns:
        ``(h, w)`` uint8.
    """
    x = _to_numpy(cam).astype(np.float32, copy=False) * np.float32(255)
    x = np.nan_to_num(np.clip(x, 0, 255), nan=0.0)
    return x.astype(np.uint8)  # truncation of non-negative values


def cam_box_mask(cam: Union[np.ndarray, torch.Tensor], threshold: float,
                 edge_quirk: bool = True) -> Tuple[np.ndarray, List[Box]]:
    """Box mask of one CAM (official ``scoremap2bbox`` with ``multi_contour_eval=True``).

    Args:
        cam: ``(h, w)`` float32 CAM (numpy or torch), normalised to ``[0, 1]``.
        threshold: relative threshold lambda (CLIP-ES: 0.4 on VOC, 0.7 on COCO);
            foreground is ``s > int(lambda * max(s))`` with ``s = uint8(cam * 255)``.
        edge_quirk: reproduce the official right/bottom clipping (end clipped to
            ``w-1``/``h-1`` then used as an exclusive end). ``False`` gives the
            geometrically correct exclusive ends ``x + bw``, ``y + bh``.

    Returns:
        ``mask``: ``(h, w)`` float32 with 1 inside any box, 0 elsewhere;
        ``boxes``: list of ``(x0, y0, x1, y1)`` ints (exclusive ends), one per
        contour, components first then holes; ``[(0, 0, 0, 0)]`` when there is no
        foreground (official behaviour for an all-zero CAM).
    """
    s = cam_to_uint8(cam)
    if s.ndim != 2:
        raise ValueError(f"expected a (h, w) map, got shape {s.shape}")
    h, w = s.shape
    thr = int(threshold * int(s.max()))  # Python double, like the official code
    fg = s > thr  # strict, as cv2.THRESH_BINARY

    boxes: List[Box] = []

    def add(x0: int, y0: int, x_end: int, y_end: int) -> None:
        # (x_end, y_end) = x + bw, y + bh of OpenCV's boundingRect
        if edge_quirk:
            x_end, y_end = min(x_end, w - 1), min(y_end, h - 1)
        boxes.append((int(x0), int(y0), int(x_end), int(y_end)))

    comp, n_comp = ndimage.label(fg, structure=_EIGHT)
    for sl in ndimage.find_objects(comp):
        add(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)

    if n_comp:
        # Holes: background regions (4-connected) not connected to the outside. The
        # zero frame makes every region touching the image border one "outside" label.
        bg = np.pad(~fg, 1, constant_values=True)
        holes, n_holes = ndimage.label(bg, structure=_FOUR)
        outside = holes[0, 0]
        for lab, sl in enumerate(ndimage.find_objects(holes), start=1):
            if sl is None or lab == outside:
                continue
            # padded coords -> image coords (-1), then grow by one pixel each side
            r0, r1 = sl[0].start - 1, sl[0].stop - 1
            c0, c1 = sl[1].start - 1, sl[1].stop - 1
            add(c0 - 1, r0 - 1, c1 + 1, r1 + 1)

    mask = np.zeros((h, w), dtype=np.float32)
    if not boxes:
        return mask, [(0, 0, 0, 0)]
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 1.0
    return mask, boxes


def cam_box_masks(cams: ArrayT, threshold: float, edge_quirk: bool = True) -> ArrayT:
    """Batched :func:`cam_box_mask` over the class axis.

    Args:
        cams: ``(K, h, w)`` float32 CAMs (numpy or torch).
        threshold: relative threshold lambda.
        edge_quirk: see :func:`cam_box_mask`.

    Returns:
        ``(K, h, w)`` float32 0/1 masks, numpy for numpy input, otherwise a tensor
        on the input's device.
    """
    arr = _to_numpy(cams)
    if arr.ndim != 3:
        raise ValueError(f"expected (K, h, w) CAMs, got shape {arr.shape}")
    out = np.stack([cam_box_mask(c, threshold, edge_quirk)[0] for c in arr]) if len(arr) else \
        np.zeros(arr.shape, dtype=np.float32)
    if isinstance(cams, torch.Tensor):
        return torch.from_numpy(out).to(cams.device)
    return out
