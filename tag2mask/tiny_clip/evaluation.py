"""Evaluation of a CLIP on the synthetic world: zero-shot multi-label mAP and dense patch mIoU.

Ground-truth masks are used here for scoring only, never for training.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tag2mask.clip.model import CLIP, CLIP_MEAN, CLIP_STD
from tag2mask.clip.tokenizer import tokenize
from tag2mask.synth.scenes import generate_scene
from tag2mask.synth.splits import seed_for
from tag2mask.synth.world import NUM_OBJECT_CLASSES, OBJECT_NAMES, STUFF_NAMES

#: The zero-shot evaluation prompt (also one of the training templates).
EVAL_TEMPLATE = "a photo of a {}."
CONCEPT_NAMES: tuple[str, ...] = OBJECT_NAMES + STUFF_NAMES  # 12 objects then 6 stuff


def image_features(model: CLIP, images: torch.Tensor, attention_from: Optional[int] = None) -> dict[str, torch.Tensor]:
    """CLS and mean-patch embeddings plus the three kinds of dense patch features (B, hw, D).

    With ``attention_from`` set, ``"attentions"`` holds the head-averaged attention (B, L, L) of
    every block from that index on (computed without SDPA, so it costs memory).
    """
    v = model.visual
    x, _ = v.embed(images)
    want, first = attention_from is not None, attention_from or 0
    inter = v.run_blocks(x, 0, v.num_blocks - 1, want, keep_tokens=False, attention_from=first)
    x = inter.last  # the last block's input: the value paths below start from it
    inter = v.run_blocks(x, v.num_blocks - 1, None, want, keep_tokens=False, out=inter, attention_from=first)
    last = v.blocks[-1]
    tokens = v.head(inter.last)
    a = last.ln_1(x)
    w = last.attn.in_proj_weight[2 * last.attn.width:]
    bias = last.attn.in_proj_bias[2 * last.attn.width:]
    val = last.attn.out_proj(F.linear(a[:, 1:], w, bias))
    mc = x[:, 1:] + val
    mc = mc + last.mlp(last.ln_2(mc))
    return {
        "cls": tokens[:, 0],
        "mean": tokens[:, 1:].mean(dim=1),
        "dense_std": tokens[:, 1:],
        "dense_maskclip": v.head(mc),
        "dense_value": v.head(val),
        **({"attentions": inter.attentions} if want else {}),
    }


# ----------------------------------------------------------------------------------------------------
# evaluation


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class (non-interpolated, as sklearn's): mean precision at each positive.

    Ties are broken by a stable sort on descending score. Returns ``nan`` without positives.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    t = targets[order]
    hits = np.cumsum(t)
    precision = hits / np.arange(1, len(t) + 1)
    return float(precision[t].sum() / n_pos)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over the columns (classes) of ``scores``/``targets`` (N, K) that have a positive."""
    aps = [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]
    aps = [a for a in aps if not math.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


_VAL_CACHE: dict[tuple[int, int], list] = {}


def _val_samples(n_val: int, size: int) -> list:
    key = (n_val, size)
    if key not in _VAL_CACHE:
        _VAL_CACHE.clear()
        _VAL_CACHE[key] = [generate_scene(seed_for("val", i), size) for i in range(n_val)]
    return _VAL_CACHE[key]


def _to_input(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def zero_shot_map(
    model: CLIP,
    n_val: int = 200,
    device: Optional[torch.device | str] = None,
    batch_size: int = 50,
    pooling: str = "cls",
    template: str = EVAL_TEMPLATE,
) -> float:
    """Zero-shot multi-label mAP over the 12 object classes on the first ``n_val`` synth val images.

    Score of class c for an image = cosine(image embedding, text embedding of ``template.format(c)``);
    ``pooling='cls'`` is the standard CLIP embedding, ``'mean'`` the mean patch token (CLIP-ES).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    size = model.visual.image_size
    samples = _val_samples(n_val, size)
    text = F.normalize(model.encode_text(tokenize([template.format(c) for c in OBJECT_NAMES]).to(device)).float(), dim=-1)
    scores = []
    for i in range(0, len(samples), batch_size):
        x = _to_input([s.image for s in samples[i : i + batch_size]], device)
        if pooling == "cls":
            e = model.encode_image(x)
        else:
            e = image_features(model, x)["mean"]
        scores.append((F.normalize(e.float(), dim=-1) @ text.t()).cpu().numpy())
    targets = np.zeros((len(samples), NUM_OBJECT_CLASSES), dtype=bool)
    for r, s in enumerate(samples):
        targets[r, [c - 1 for c in s.labels]] = True
    model.train(was_training)
    return mean_average_precision(np.concatenate(scores), targets)


@torch.no_grad()
def dense_miou(model: CLIP, n_val: int = 100, device: Optional[torch.device | str] = None, batch_size: int = 25) -> dict[str, float]:
    """Diagnostic (uses GT masks, evaluation only): mIoU of per-patch argmax over the 18 concept prompts.

    Stuff concepts count as background (0). For each dense feature kind of :func:`image_features`,
    patches are classified, the label map is upsampled (nearest) to the image and compared with the
    GT (255 ignored); mIoU over the 13 classes (background + 12 objects) present in GT or prediction.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    size = model.visual.image_size
    samples = _val_samples(n_val, size)
    prompts = [EVAL_TEMPLATE.format(c) for c in CONCEPT_NAMES]
    text = F.normalize(model.encode_text(tokenize(prompts).to(device)).float(), dim=-1)
    to_label = torch.tensor(list(range(1, NUM_OBJECT_CLASSES + 1)) + [0] * len(STUFF_NAMES), device=device)
    kinds = ("dense_std", "dense_maskclip", "dense_value")
    inter = {k: np.zeros(NUM_OBJECT_CLASSES + 1) for k in kinds}
    union = {k: np.zeros(NUM_OBJECT_CLASSES + 1) for k in kinds}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        feats = image_features(model, _to_input([s.image for s in chunk], device))
        gt = torch.from_numpy(np.stack([s.mask for s in chunk])).to(device).long()
        g = size // model.visual.patch_size
        for k in kinds:
            lab = to_label[(F.normalize(feats[k].float(), dim=-1) @ text.t()).argmax(-1)].view(-1, 1, g, g).float()
            pred = F.interpolate(lab, size=gt.shape[-2:], mode="nearest").long().squeeze(1)
            valid = gt != 255
            for c in range(NUM_OBJECT_CLASSES + 1):
                p, t = (pred == c) & valid, (gt == c) & valid
                inter[k][c] += (p & t).sum().item()
                union[k][c] += (p | t).sum().item()
    model.train(was_training)
    return {k: float(np.mean(inter[k][union[k] > 0] / union[k][union[k] > 0])) for k in kinds}
