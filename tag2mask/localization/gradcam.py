"""GradCAM on the last block of a CLIP ViT: every (image, target) pair from one forward pass.

The official CLIP-ES code runs one forward + backward of the last block per class. Here the last
block runs once on the whole batch and only the vector-Jacobian products with respect to its
``ln_1`` output are formed, one per (image, target) pair, either batched (one-hot cotangents,
``is_grads_batched``) or one after another on the retained graph.

:func:`last_block_gradcam` is the method-agnostic core: the caller says how the block output
becomes target scores (CLIP-ES: plain softmax over text rows; FMA-WSSS: masked softmax over
learned prompts) and which pairs to explain; it can keep the graph (``create_graph``) so that a
loss on the CAMs reaches whatever the targets depend on (learned prompts).
:func:`softmax_gradcam` is CLIP-ES's use of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from tag2mask.clip.vision import VisionTransformer


@dataclass
class GradCAMOutput:
    """Softmax-GradCAM results for one image.

    cams: (K, h, w) float32, after ReLU and the official double min-max normalisation.
    cams_raw: (K, h, w) float32, ReLU(sum_c w_c A_c) before normalisation.
    probs: (T,) float32, softmax over the T text rows (identical for every class copy).
    activation: (C, h, w) float32, the last block's ``ln_1`` output (patch tokens).
    grad_weights: (K, C) float32, spatial mean of each class's gradient.
    last_attention: (L, L) float32, the last block's head-averaged attention (CLS at 0).
    """

    cams: torch.Tensor
    cams_raw: torch.Tensor
    probs: torch.Tensor
    activation: torch.Tensor
    grad_weights: torch.Tensor
    last_attention: torch.Tensor


def minmax_twice(cams: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The official ``scale_cam_image`` applied twice per map: ``x -= min; x /= eps + max``.

    The epsilon is absolute, so the second pass matters when the first leaves a small maximum.
    (K, h, w) -> (K, h, w).
    """
    for _ in range(2):
        flat = cams.flatten(1)
        flat = flat - flat.min(dim=1, keepdim=True).values
        flat = flat / (eps + flat.max(dim=1, keepdim=True).values)
        cams = flat.view_as(cams)
    return cams


TargetRows = Union[Sequence[int], Sequence[Sequence[int]]]


def _target_matrix(targets: TargetRows, num_rows: int, device: torch.device) -> torch.Tensor:
    """(K, T) 0/1 matrix: class k's target is the summed probability of its text rows (its synonyms)."""
    mat = torch.zeros(len(targets), num_rows, device=device)
    for k, rows in enumerate(targets):
        rows = [rows] if isinstance(rows, int) else list(rows)
        if not rows:
            raise ValueError(f"target {k} has no text rows")
        mat[k, rows] = 1.0
    return mat


@dataclass
class LastBlockGradCAM:
    """What :func:`last_block_gradcam` returns (B images, P pairs, L = 1 + h*w tokens, C channels).

    cams: (P, h, w) raw GradCAM ``sum_c w_c A_c`` of every pair: no ReLU, no normalisation;
        differentiable w.r.t. what the targets depend on when ``create_graph`` was set.
    grad_weights: (P, C) mean over all patch tokens of each pair's gradient.
    targets: (B, K) the target scores (graph kept).
    activation: (B, L, C) the last block's ``ln_1`` output (detached; CLS at 0).
    attention: (B, L, L) the last block's head-averaged attention, or None.
    """

    cams: torch.Tensor
    grad_weights: torch.Tensor
    targets: torch.Tensor
    activation: torch.Tensor
    attention: Optional[torch.Tensor]


TargetFn = Callable[[torch.Tensor], torch.Tensor]


def last_block_gradcam(
    visual: VisionTransformer,
    last_input: torch.Tensor,
    grid: tuple[int, int],
    target_fn: TargetFn,
    pairs: torch.Tensor,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    create_graph: bool = False,
    vjp_mode: str = "auto",
    need_attention: bool = True,
    fp16_arithmetic: bool = False,
) -> LastBlockGradCAM:
    """GradCAM at the last block's ``ln_1`` output for every (image, target) pair.

    last_input: (B, L, C) residual stream entering the last block (detached here).
    target_fn: block output (B, L, C) -> target scores (B, K); image b's scores may depend on
        image b's tokens only.
    pairs: (P, 2) long, rows ``(image index, target column)``; P = 0 gives empty CAMs (targets only).
    attn_mask: additive attention mask of the last block (e.g. padded keys), see
        :func:`tag2mask.clip.vision.key_padding_attn_mask`.
    create_graph: keep the graph of the gradients (a loss on ``cams`` then trains what the
        targets depend on; the activation itself is detached, as in the official FMA-WSSS code).
    vjp_mode: ``'vmap'`` (batched one-hot cotangents, best on GPUs), ``'loop'`` (one VJP after
        another on the retained graph, best on CPUs: measured 0.49 s vs 0.80 s for 3 targets at
        ViT-B/16, 500x375, 2 threads) or ``'auto'`` (by device).

    Channel weights are the mean of the gradient over all h*w patch tokens (tokens hidden by
    ``attn_mask`` included: their gradient is 0 and dilutes the mean, as FMA-WSSS does).
    ``fp16_arithmetic``: the official GradCAM's arithmetic on float16 arrays (WeCLIP's GPU numerics):
    the channel weights are rounded to float16, every weight × activation product too, and the channel
    sum (accumulated in float32, as numpy does along the contiguous channel axis) is rounded once.
    """
    if vjp_mode == "auto":
        vjp_mode = "vmap" if last_input.device.type == "cuda" else "loop"
    if vjp_mode not in ("vmap", "loop"):
        raise ValueError(f"vjp_mode must be 'auto', 'vmap' or 'loop', got {vjp_mode!r}")
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    n_pairs = pairs.shape[0]
    h, w = grid
    block = visual.blocks[-1]
    x = last_input.detach()
    captured: dict[str, torch.Tensor] = {}

    def capture(a: torch.Tensor) -> torch.Tensor:
        a = a.detach().requires_grad_(True)
        captured["a"] = a
        return a

    with torch.enable_grad():
        out, attn = block(x, attn_mask=attn_mask, need_weights=need_attention, ln1_hook=capture)
        targets = target_fn(out)
        if targets.dim() != 2 or targets.shape[0] != x.shape[0]:
            raise ValueError(f"target_fn must return (B={x.shape[0]}, K) scores, got {tuple(targets.shape)}")
        images, columns = pairs[:, 0].to(targets.device), pairs[:, 1].to(targets.device)
        act = captured["a"]
        if n_pairs == 0:  # nothing to explain (e.g. training crops without a labelled class): targets only
            empty = act.new_zeros((0, h, w))
            return LastBlockGradCAM(cams=empty, grad_weights=act.new_zeros((0, act.shape[-1])), targets=targets,
                                    activation=act.detach(), attention=attn.detach() if attn is not None else None)
        grads = _pair_gradients(targets, act, images, columns, vjp_mode, create_graph)
    weights = grads[:, 1:].float().mean(dim=1)  # (P, C)
    if fp16_arithmetic:
        weights = weights.half().float()
    activation = act.detach()
    cams = _weighted_cams(weights, activation, pairs, fp16_arithmetic)
    return LastBlockGradCAM(
        cams=cams.view(n_pairs, h, w),
        grad_weights=weights,
        targets=targets,
        activation=activation,
        attention=attn.detach() if attn is not None else None,
    )


def _pair_gradients(targets: torch.Tensor, act: torch.Tensor, images: torch.Tensor, columns: torch.Tensor,
                    vjp_mode: str, create_graph: bool) -> torch.Tensor:
    """``(P, L, C)`` gradient of each pair's target score ``targets[images[p], columns[p]]`` w.r.t. its image's
    activation ``act`` ``(B, L, C)``: one batched VJP of one-hot cotangents (``vmap``) or one VJP per pair."""
    n_pairs = images.shape[0]
    if vjp_mode == "vmap":
        cotangents = torch.zeros((n_pairs,) + tuple(targets.shape), device=targets.device, dtype=targets.dtype)
        cotangents[torch.arange(n_pairs, device=targets.device), images, columns] = 1
        (grads,) = torch.autograd.grad(
            targets, act, grad_outputs=cotangents, is_grads_batched=True, create_graph=create_graph
        )
        return grads[torch.arange(n_pairs, device=grads.device), images.to(grads.device)]  # (P, L, C)
    return torch.stack(
        [
            torch.autograd.grad(
                targets[images[p], columns[p]], act,
                retain_graph=create_graph or p < n_pairs - 1, create_graph=create_graph,
            )[0][images[p]]
            for p in range(n_pairs)
        ]
    )


def _weighted_cams(weights: torch.Tensor, activation: torch.Tensor, pairs: torch.Tensor,
                   fp16_arithmetic: bool) -> torch.Tensor:
    """``sum_c w_c A_c`` of every pair: weights (P, C), activation (B, L, C), pairs (P, 2) -> (P, hw)."""
    parts, order = [], []
    for b in torch.unique(pairs[:, 0]).tolist():
        sel = torch.nonzero(pairs[:, 0] == b).flatten()
        w_b = weights[sel.to(weights.device)]
        if fp16_arithmetic:  # fp16 products, float32 channel sum, one rounding
            prod = (w_b.half()[:, None, :] * activation[b, 1:].half()[None]).float()  # (K_b, hw, C)
            parts.append(prod.sum(dim=-1).half().float())
        else:
            parts.append(w_b @ activation[b, 1:].float().t())  # (K_b, hw)
        order.append(sel)
    # assembled out of place so that the graph (create_graph) survives
    return torch.cat(parts)[torch.argsort(torch.cat(order)).to(weights.device)]


def softmax_gradcam(
    visual: VisionTransformer,
    last_input: torch.Tensor,
    grid: tuple[int, int],
    text_features: torch.Tensor,
    targets: TargetRows,
    logit_scale: float,
    vjp_mode: str = "auto",
    fp16_arithmetic: bool = False,
) -> GradCAMOutput:
    """CLIP-ES's Softmax-GradCAM of ``targets`` for one image (through :func:`last_block_gradcam`).

    last_input: (1, L, C) residual stream entering the last block (no grad needed).
    text_features: (T, D) text embeddings (normalised again here, as the official code does).
    targets: per class, a text-row index (or a list of rows whose probabilities are summed: synonyms).
    The image embedding is the mean of the patch tokens after ``ln_post`` and ``proj`` (not CLS);
    logits = ``logit_scale`` * cosine; the target of class k is its softmax probability,
    differentiated at the last block's ``ln_1`` output (the residual path bypasses it).
    The CAMs are then ReLU'd and min-max normalised twice (official ``scale_cam_image``).
    ``fp16_arithmetic`` (WeCLIP's official numerics, a float16 last block): the image embedding is
    pooled before the projection (``ln_post`` → mean over patch tokens → ``proj``, the official order),
    normalised, scaled and softmaxed in float16, and the CAM arithmetic is the official float16 one
    (:func:`last_block_gradcam`).
    """
    k = len(targets)
    if k == 0:
        raise ValueError("softmax_gradcam needs at least one target class")
    text = F.normalize(text_features.float(), dim=-1)
    select = _target_matrix(targets, text.shape[0], last_input.device)
    saved: dict[str, torch.Tensor] = {}

    text16 = text_features.half() / text_features.half().norm(dim=-1, keepdim=True)

    def target_fn(out: torch.Tensor) -> torch.Tensor:
        if fp16_arithmetic:
            feats = visual.ln_post(out)[:, 1:].mean(dim=1) @ visual.proj
            feats = feats / feats.norm(dim=-1, keepdim=True)
            probs = (logit_scale * feats @ text16.t()).softmax(dim=-1)  # (1, T) float16
        else:
            feats = visual.head(out[:, 1:]).mean(dim=1)
            feats = F.normalize(feats.float(), dim=-1)
            probs = (logit_scale * feats @ text.t()).softmax(dim=-1)  # (1, T)
        saved["probs"] = probs
        return (probs * select).sum(dim=-1)[None]  # (1, K)

    pairs = torch.stack([torch.zeros(k, dtype=torch.long), torch.arange(k)], dim=1)
    res = last_block_gradcam(visual, last_input, grid, target_fn, pairs, vjp_mode=vjp_mode,
                             fp16_arithmetic=fp16_arithmetic)
    h, w = grid
    cams_raw = torch.relu(res.cams)
    return GradCAMOutput(
        cams=minmax_twice(cams_raw.clone()),
        cams_raw=cams_raw,
        probs=saved["probs"][0].detach(),
        activation=res.activation[0, 1:].float().t().reshape(-1, h, w),
        grad_weights=res.grad_weights,
        last_attention=res.attention[0],
    )
