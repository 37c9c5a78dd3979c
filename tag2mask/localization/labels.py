"""From per-class maps to a label map: ``[0, keys + 1][argmax([background; CAMs])]``, the one helper.

Every method ends here (CLIP-ES seeds and CRF labels, WeCLIP's online pseudo labels, the CAM
evaluation). The rules are the official ones:

* the background score comes from the foreground maps alone, ``(1 - max_k cam_k) ** p``, computed in
  the maps' own dtype (float16 CAMs give the float16 result the official evaluation compares; the
  power is skipped for ``p = 1`` so the value stays bit-exact);
* ties go to the first channel: background, then the order of ``keys``;
* optionally, pixels whose winning score is below ``confidence`` become 255 (CLIP-ES's ignore region).

numpy inputs give a ``(H, W)`` uint8 map, torch inputs a ``(H, W)`` int64 tensor on their device.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "label_table", "with_background", "labels_from_scores", "cams_to_labels"]

IGNORE_INDEX = 255
Maps = Union[np.ndarray, torch.Tensor]


def label_table(keys: Union[Sequence[int], np.ndarray, torch.Tensor]) -> np.ndarray:
    """``[0, keys + 1]``: channel index of ``[background; CAMs]`` → label id. ``(K,)`` → ``(K + 1,)`` int64."""
    k = np.asarray(keys.cpu() if isinstance(keys, torch.Tensor) else keys, dtype=np.int64).reshape(-1)
    return np.concatenate([np.zeros(1, dtype=np.int64), k + 1])


def with_background(cams: Maps, power: float = 1.0, threshold: Optional[float] = None) -> Maps:
    """``[bg; cams]``: ``(K, H, W)`` → ``(K + 1, H, W)`` in the dtype of ``cams``.

    ``bg = (1 - max_k cams_k) ** power`` (every operation in the maps' dtype, as the official numpy
    code on float16 CAMs), or the constant ``threshold`` (IRN-style evaluation) when given.
    An empty stack (no class) gets background 1 everywhere.
    """
    if isinstance(cams, torch.Tensor):
        if threshold is not None:
            bg = torch.full((1, *cams.shape[1:]), threshold, dtype=cams.dtype, device=cams.device)
        elif cams.shape[0] == 0:
            bg = torch.ones((1, *cams.shape[1:]), dtype=cams.dtype, device=cams.device)
        else:
            bg = 1 - cams.amax(dim=0, keepdim=True)
            if power != 1.0:
                bg = bg**power
        return torch.cat([bg, cams], dim=0)
    cams = np.asarray(cams)
    dt = cams.dtype.type
    if threshold is not None:
        bg = np.full((1, *cams.shape[1:]), threshold, dtype=cams.dtype)
    elif cams.shape[0] == 0:
        bg = np.ones((1, *cams.shape[1:]), dtype=cams.dtype)
    else:
        bg = dt(1) - cams.max(axis=0, keepdims=True)
        if power != 1.0:
            bg = np.power(bg, dt(power))
        bg = bg.astype(cams.dtype, copy=False)
    return np.concatenate([bg, cams], axis=0)


def labels_from_scores(scores: Maps, keys: Union[Sequence[int], np.ndarray, torch.Tensor],
                       confidence: Optional[float] = None) -> Maps:
    """Arg-max over ``scores`` ``(K + 1, H, W)`` (channel 0 = background) → label ids.

    Args:
        scores: ``[bg; classes]`` maps, numpy or torch, any float dtype (compared in that dtype).
        keys: ``(K,)`` 0-based class ids of channels 1..K.
        confidence: pixels whose maximum score is below it (strict) become 255.

    Returns:
        ``(H, W)`` uint8 (numpy) or int64 tensor on the scores' device; ties → the first channel.
    """
    table = label_table(keys)
    if table.shape[0] != scores.shape[0]:
        raise ValueError(f"{table.shape[0] - 1} keys for {scores.shape[0]} score channels (expected K + 1)")
    if isinstance(scores, torch.Tensor):
        lut = torch.from_numpy(table).to(scores.device)
        label = lut[scores.argmax(dim=0)]  # torch.argmax also returns the first maximal index
        if confidence is not None:
            label = torch.where(scores.amax(dim=0) < confidence, torch.full_like(label, IGNORE_INDEX), label)
        return label
    s = np.asarray(scores)
    if s.ndim != 3:
        raise ValueError(f"expected (C, H, W) scores, got shape {s.shape}")
    if table.size and table.max() >= IGNORE_INDEX:
        raise ValueError(f"class id {int(table.max()) - 1} does not fit a uint8 label map")
    label = table.astype(np.uint8)[np.argmax(s, axis=0)]
    if confidence is not None:
        label[s.max(axis=0) < confidence] = IGNORE_INDEX
    return label


def cams_to_labels(cams: Maps, keys: Union[Sequence[int], np.ndarray, torch.Tensor], bg_power: float = 1.0,
                   threshold: Optional[float] = None, confidence: Optional[float] = None) -> Maps:
    """:func:`labels_from_scores` of :func:`with_background`: ``(K, H, W)`` CAMs → ``(H, W)`` labels."""
    return labels_from_scores(with_background(cams, bg_power, threshold), keys, confidence)
