"""MaskCLIP's two test-time refinements: prompt denoising (PD) and key smoothing (KS).

Both act on the dense cosine logits at feature resolution, before any upsampling, and both
compute their confidences with ``softmax(100 · logits)`` over the prompt axis (CLIP's trained
temperature), independently of the temperature used later for the final prediction.

Paper vs official code (``MaskClipHead.refine_output``)
-------------------------------------------------------
The paper describes key smoothing as ``pred_i = Σ_j cos(k_i, k_j) · pred_j``. The official code
stores the keys as ``(N, h*w, C)`` and calls ``F.normalize(k, p=2)``, whose default ``dim=1`` is the
**position** axis: every channel is scaled to unit norm over the image, and ``k kᵀ`` is then *not*
a cosine-similarity matrix. The released numbers come from that code, so it is our default;
``paper_form=True`` normalises each key over channels (true cosine) as the paper writes.
Neither form row-normalises the weights, so smoothed pixels hold unbounded weighted sums while
untouched pixels keep probabilities; we reproduce that as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MASKCLIP_TEMPERATURE", "prompt_denoise", "key_smoothing_weights", "key_smooth"]

#: the ×100 used inside PD and KS (``output * 100`` in the official head)
MASKCLIP_TEMPERATURE: float = 100.0


def prompt_denoise(
    logits: torch.Tensor, threshold: float = 0.5, temperature: float = MASKCLIP_TEMPERATURE, fill: float = -100.0
) -> torch.Tensor:
    """Remove prompts that are never confident anywhere in the image.

    Args:
        logits: raw cosine logits ``(B, K, h, w)`` float32 (K = prompts).
        threshold: a prompt is removed when ``max over pixels of softmax(temperature·logits)`` is
            below it (the paper's t = 0.5; the code's default 0 disables PD).
        temperature: softmax temperature for the confidence (100 in the official code).
        fill: value written into a removed prompt's logits at every pixel (-100 officially).

    Returns:
        A new ``(B, K, h, w)`` tensor; ``logits`` is not modified.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K, h, w), got shape {tuple(logits.shape)}")
    if threshold <= 0:
        return logits.clone()
    probs = F.softmax(logits * temperature, dim=1)
    peak = probs.flatten(2).amax(dim=-1)  # (B, K): best confidence of each prompt over the image
    removed = (peak < threshold)[:, :, None, None]
    return logits.masked_fill(removed, fill)


def key_smoothing_weights(keys: torch.Tensor, paper_form: bool = False) -> torch.Tensor:
    """The KS affinity ``W = k̂ k̂ᵀ`` from keys ``(B, h*w, C)`` -> ``(B, h*w, h*w)``.

    ``paper_form=False`` (official code): ``k̂[:, :, c] = k[:, :, c] / ‖k[:, :, c]‖`` (norm over
    positions). ``paper_form=True``: ``k̂[:, i] = k[:, i] / ‖k[:, i]‖`` (cosine similarity).
    No softmax and no row normalisation in either form.
    """
    if keys.ndim != 3:
        raise ValueError(f"keys must be (B, h*w, C), got shape {tuple(keys.shape)}")
    k = F.normalize(keys, p=2, dim=-1 if paper_form else 1)
    return k @ k.transpose(-2, -1)


def key_smooth(
    logits: torch.Tensor,
    keys: torch.Tensor,
    threshold: float = 1.0,
    paper_form: bool = False,
    temperature: float = MASKCLIP_TEMPERATURE,
) -> torch.Tensor:
    """Key smoothing: replace uncertain pixels' class probabilities by key-affinity-weighted sums.

    Args:
        logits: cosine logits ``(B, K, h, w)`` (after :func:`prompt_denoise` when both are used).
        keys: ``(B, h*w, C)`` last-block keys in row-major grid order (ViT: ``W_o(W_k LN1(x)+b_k)+b_o``
            without CLS; ResNet: ``k_proj(x)``).
        threshold: pixels whose ``max_c softmax(temperature·logits)`` is below it are smoothed
            (1.0 in the commented-out official configs: every non-saturated pixel).
        paper_form: cosine affinity (paper) instead of the official position-normalised keys.
        temperature: 100 as in the official code.

    Returns:
        ``(B, K, h, w)``: ``P = softmax(temperature·logits)`` with the selected pixels replaced by
        ``(W @ P)``; the output therefore mixes probabilities and unbounded sums (see module doc).
        ``threshold <= 0`` returns ``logits`` unchanged (KS off), as the official code does.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K, h, w), got shape {tuple(logits.shape)}")
    b, c, h, w = logits.shape
    if keys.shape[:2] != (b, h * w):
        raise ValueError(f"keys {tuple(keys.shape)} do not match logits {tuple(logits.shape)}: expected ({b}, {h * w}, C)")
    if threshold <= 0:
        return logits.clone()
    probs = F.softmax(logits * temperature, dim=1).flatten(2).transpose(1, 2)  # (B, hw, K)
    weights = key_smoothing_weights(keys.to(probs.dtype), paper_form=paper_form)
    smoothed = weights @ probs
    uncertain = probs.amax(dim=-1, keepdim=True) < threshold  # (B, hw, 1), broadcast over classes
    out = torch.where(uncertain, smoothed, probs)
    return out.transpose(1, 2).reshape(b, c, h, w)
