"""FMA-WSSS's CLIP side: a frozen CLIP ViT, learned prompts, classification and GradCAM.

Per batch (official ``GradCAMCLIP``):

1. positional table resized bilinearly to the patch grid; for padded batches it is resized to
   the bounding box of each image's real patches and zero elsewhere, and patches whose pixels
   are all padding are hidden as attention keys in every block (:func:`padding_layout`);
2. frozen blocks 1..L-1, keeping head-averaged attention for the CAA affinity;
3. last block: image embedding = mean of the real patch tokens after ``ln_post``, ``@ proj``
   (not the CLS token); logits = ``logit_scale.exp() * cos`` against every prompt;
4. GradCAM target = the official masked softmax (:func:`masked_softmax`) over the present
   foreground classes and all background prompts; all positive (image, class) pairs in one
   forward of the last block (:func:`tag2mask.localization.gradcam.last_block_gradcam`), with
   ``create_graph`` in training so that a loss on the CAMs reaches the prompt contexts.

CAMs are raw (no ReLU, no normalisation), as the official model returns them.

Numerics: :class:`FMAClip` applies FMA-WSSS's own (:data:`tag2mask.clip.numerics.NUMERICS` ``"fma"``:
Conv/Linear weights and projections rounded to fp16 as the official loader leaves them, the
interpolated positional table *not* rounded, TF32 off) to the CLIP it is given, on every call,
like ClipES and WeCLIP do. A CLIP loaded with ``round_fp16_weights=True`` is used as is. Otherwise
FMAClip works on its own rounded copy of the CLIP and the caller's model keeps its float32 weights
(the copy costs the model's memory once more: load with ``round_fp16_weights=True`` to avoid it).
A copy, not weights swapped in only during the call as ClipES does: gradients reach the prompt
contexts through the frozen CLIP in a backward pass that runs after the call has returned, and
autograd does not keep the forward-time values of every frozen weight it saved (``x @ W`` reads
``W`` again in backward), so swapped weights would give the wrong context gradient.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from tag2mask.clip.model import CLIP
from tag2mask.clip.loading import round_weights_to_fp16
from tag2mask.clip.numerics import NUMERICS, Numerics, weights_are_fp16_exact
from tag2mask.clip.vision import VisionTransformer, key_padding_attn_mask
from tag2mask.localization.affinity import mean_attention
from tag2mask.localization.gradcam import LastBlockGradCAM, last_block_gradcam
from tag2mask.methods.fma.prompts import PromptLearner

__all__ = ["FMAClip", "FMAOutput", "PaddingLayout", "padding_layout", "masked_softmax", "positive_pairs"]

#: AlchemyCat's MaskedSoftmax epsilon (added to the masked sum; see :func:`masked_softmax`)
MASKED_SOFTMAX_EPS = 1e-5


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, eps: float = MASKED_SOFTMAX_EPS) -> torch.Tensor:
    """The official masked softmax: ``mask * e / (sum(mask * e) + eps)``, ``e = exp(l - max_all l)``.

    The maximum is taken over *all* logits, masked ones included, and ``eps`` is absolute, so
    rows do not sum to 1 exactly and a masked class holding the row maximum still receives
    gradient. (B, G) float, (B, G) 0/1 -> (B, G).
    """
    mask = mask.to(logits.dtype)
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    masked = mask * e
    return masked / (masked.sum(dim=-1, keepdim=True) + eps)


def positive_pairs(fg_labels: torch.Tensor) -> torch.Tensor:
    """(image, class) of every positive label, image-major then class ascending: (B, F) -> (P, 2) long."""
    return torch.nonzero(fg_labels > 0).to(torch.long)


@dataclass
class PaddingLayout:
    """Which patches of a padded batch are real.

    key_padding: (B, L) bool, True = a patch whose pixels are all padding (CLS column False).
    boxes: (B, 4) long ``(i, j, h, w)`` in patches: bounding box of each image's real patches.
    """

    key_padding: torch.Tensor
    boxes: torch.Tensor


def padding_layout(padding_mask: torch.Tensor, patch_size: int) -> PaddingLayout:
    """Patch-level layout of a pixel padding mask (B, H, W) bool (True = padding).

    A patch counts as padding only if all of its pixels are padding; partially padded patches
    are real tokens. H and W must be multiples of the patch size.
    """
    b, height, width = padding_mask.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"padded size {height}x{width} is not a multiple of the patch size {patch_size}")
    h, w = height // patch_size, width // patch_size
    all_pad = padding_mask.reshape(b, h, patch_size, w, patch_size).all(dim=4).all(dim=2)  # (B, h, w)
    real = ~all_pad
    if not bool(real.flatten(1).any(dim=1).all()):
        raise ValueError("an image of the batch is padding only")
    rows, cols = real.any(dim=2), real.any(dim=1)
    boxes = []
    for i in range(b):
        r = torch.nonzero(rows[i]).flatten()
        c = torch.nonzero(cols[i]).flatten()
        boxes.append([int(r[0]), int(c[0]), int(r[-1] - r[0] + 1), int(c[-1] - c[0] + 1)])
    key_padding = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=padding_mask.device), all_pad.flatten(1)], 1)
    return PaddingLayout(key_padding=key_padding, boxes=torch.tensor(boxes, dtype=torch.long))


def placed_pos_embed(visual: VisionTransformer, layout: PaddingLayout, grid: tuple[int, int]) -> torch.Tensor:
    """Per-image positional tables (B, L, C): the table resized to each image's real-patch box,
    placed there, zero on padded patches; the CLS row kept (not rounded to fp16)."""
    h, w = grid
    tables = []
    for i, j, bh, bw in layout.boxes.tolist():
        small = visual.interpolate_pos_embed(bh, bw, mode="bilinear", round_fp16=False)
        patch = small.new_zeros(h, w, small.shape[1])
        patch[i : i + bh, j : j + bw] = small[1:].reshape(bh, bw, -1)
        tables.append(torch.cat([small[:1], patch.reshape(h * w, -1)], dim=0))
    return torch.stack(tables)


@dataclass
class FMAOutput:
    """One batch through :class:`FMAClip` (B images, G prompts, P positive pairs, C = ViT width).

    img_emb: (B, D) image embeddings (not normalised).
    logits: (B, G) ``logit_scale.exp() * cos``.
    sm_logits: (B, G) masked-softmax targets.
    pos_pairs: (P, 2) (image, fg class) of the CAMs.
    pos_cam: (P, h, w) raw GradCAMs (differentiable w.r.t. the prompts with ``create_graph``).
    grad_weights: (P, C) GradCAM channel weights.
    activation: (B, L, C) ``ln_1`` output of the last block (detached).
    attention: (B, hw, hw) mean of the last ``attention_layers`` head-averaged attention maps
        without the CLS token, or None.
    pos_embed: (L, C) or (B, L, C) the positional table that was added.
    key_padding: (B, L) bool or None.
    """

    img_emb: torch.Tensor
    logits: torch.Tensor
    sm_logits: torch.Tensor
    pos_pairs: torch.Tensor
    pos_cam: torch.Tensor
    grad_weights: torch.Tensor
    activation: torch.Tensor
    attention: Optional[torch.Tensor]
    pos_embed: torch.Tensor
    key_padding: Optional[torch.Tensor]
    grid: tuple[int, int]


class FMAClip(nn.Module):
    """Frozen CLIP ViT + :class:`PromptLearner`; only the prompt contexts are trainable.

    Args:
        clip: a ViT CLIP, frozen here (its parameters stop requiring gradients). When ``numerics``
            round weights and ``clip``'s are not fp16-exact, a rounded copy is used instead and
            ``clip`` is left as it is (see the module docstring).
        prompts: G prompts, the first ``n_fg`` of which are the foreground classes.
        n_fg: number of foreground classes F (the rest are background prompts, always unmasked).
        attention_layers: how many final attention maps feed the CAA affinity (8).
        numerics: the arithmetic the CLIP runs with (default: FMA-WSSS's official numerics, see
            the module docstring; ``NUMERICS["float32"]`` for models trained in plain float32,
            e.g. the shipped tiny CLIP).
    """

    def __init__(self, clip: CLIP, prompts: PromptLearner, n_fg: int, attention_layers: int = 8,
                 numerics: Numerics = NUMERICS["fma"]):
        super().__init__()
        if not clip.is_vit:
            raise ValueError("FMA-WSSS needs a ViT image tower (GradCAM acts on its tokens)")
        if not 0 < n_fg <= prompts.num_classes:
            raise ValueError(f"n_fg must be in 1..{prompts.num_classes}, got {n_fg}")
        if numerics.round_weights_fp16 and not weights_are_fp16_exact(clip):
            clip = copy.deepcopy(clip)
            round_weights_to_fp16(clip)
        self.clip = clip.requires_grad_(False)
        self.prompts = prompts
        self.n_fg = n_fg
        self.attention_layers = attention_layers
        # nothing left to copy: the binding sets the positional-table interpolation and TF32 per call
        self.numerics = numerics.bind(clip)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.prompts.ctx]

    def text_features(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(G, D) text features of the prompts, or (len(rows), D) (graph to the contexts when grad is enabled)."""
        with self.numerics:
            return self.prompts.text_features(self.clip, rows=rows)

    def forward(
        self,
        images: torch.Tensor,
        fg_labels: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        create_graph: bool = False,
        need_attention: bool = True,
        vjp_mode: str = "auto",
        require_positive: bool = True,
        need_cams: bool = True,
        text_features: Optional[torch.Tensor] = None,
    ) -> FMAOutput:
        """images (B, 3, H, W) CLIP-normalised, fg_labels (B, F) 0/1, padding_mask (B, H, W) bool or None.

        ``create_graph=True`` (training) keeps the graph from the CAMs to the prompt contexts.
        Every image needs at least one positive label, unless ``require_positive=False`` (training
        crops whose seed holds no class): such images get no CAM, and a batch without any
        positive gives ``pos_cam`` of shape (0, h, w). ``need_cams=False`` skips GradCAM (logits
        only, e.g. training with the contrastive loss alone): ``pos_pairs`` and ``pos_cam`` are then empty.
        ``text_features``: (G, D) from :meth:`text_features`, to skip the text tower when the prompts
        do not change between calls (inference).
        """
        with self.numerics:
            return self._forward(images, fg_labels, padding_mask, create_graph, need_attention, vjp_mode,
                                 require_positive, need_cams, text_features)

    def _forward(self, images, fg_labels, padding_mask, create_graph, need_attention, vjp_mode,
                 require_positive, need_cams, text_features) -> FMAOutput:
        visual = self.clip.visual
        fg_labels = fg_labels.to(images.device)
        pairs = self._positive_pairs(images, fg_labels, require_positive)
        grid, layout, attn_mask, pos_embed = self._token_layout(images, padding_mask)

        first = max(0, visual.num_blocks - self.attention_layers)
        with torch.no_grad():
            inter = visual.forward_intermediates(
                images, visual.num_blocks - 1, return_attention=need_attention, keep_tokens=False,
                attention_from=first, pos_embed=pos_embed, attn_mask=attn_mask,
            )
        text = self.prompts.text_features(self.clip) if text_features is None else text_features
        text = text / text.norm(dim=-1, keepdim=True)
        logit_scale = self.clip.logit_scale.detach().exp()
        sm_mask = torch.ones(images.shape[0], text.shape[0], dtype=text.dtype, device=text.device)
        sm_mask[:, : self.n_fg] = (fg_labels > 0).to(text.dtype)
        real = None if layout is None else (~layout.key_padding[:, 1:]).to(images.dtype)
        saved: dict[str, list[torch.Tensor]] = {"img_emb": [], "logits": []}

        def make_target_fn(lo: int, hi: int):
            def target_fn(out: torch.Tensor) -> torch.Tensor:
                tokens = visual.ln_post(out[:, 1:])
                if real is None:
                    pooled = tokens.mean(dim=1)
                else:
                    r = real[lo:hi]
                    pooled = (tokens * r[..., None]).sum(dim=1) / r.sum(dim=1, keepdim=True)
                img_emb = pooled @ visual.proj
                logits = logit_scale * (img_emb / img_emb.norm(dim=-1, keepdim=True)) @ text.t()
                saved["img_emb"].append(img_emb)
                saved["logits"].append(logits)
                return masked_softmax(logits, sm_mask[lo:hi])

            return target_fn

        if not need_cams:
            pairs = pairs[:0]
        mode = vjp_mode if vjp_mode != "auto" else ("vmap" if images.device.type == "cuda" else "loop")
        res = _grouped_gradcam(visual, inter.last, grid, make_target_fn, pairs, attn_mask, create_graph,
                               need_attention, mode)
        attention = None
        if need_attention:
            maps = [a.float() for a in inter.attentions] + [res.attention.float()]
            attention = torch.stack([mean_attention([m[b] for m in maps], last=self.attention_layers)
                                     for b in range(images.shape[0])])
        return FMAOutput(
            img_emb=torch.cat(saved["img_emb"]),
            logits=torch.cat(saved["logits"]),
            sm_logits=res.targets,
            pos_pairs=pairs,
            pos_cam=res.cams,
            grad_weights=res.grad_weights,
            activation=res.activation,
            attention=attention,
            pos_embed=pos_embed,
            key_padding=None if layout is None else layout.key_padding,
            grid=grid,
        )

    def _positive_pairs(self, images: torch.Tensor, fg_labels: torch.Tensor, require_positive: bool) -> torch.Tensor:
        """``(P, 2)`` int64 (image, class) pairs of the positive labels; checks the labels' shape."""
        if fg_labels.shape != (images.shape[0], self.n_fg):
            raise ValueError(f"fg_labels must be (B, {self.n_fg}), got {tuple(fg_labels.shape)}")
        pairs = positive_pairs(fg_labels)
        missing = set(range(images.shape[0])) - set(pairs[:, 0].tolist())
        if missing and require_positive:
            raise ValueError(f"images {sorted(missing)} of the batch have no positive class")
        return pairs

    def _token_layout(self, images: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        """The token ``grid`` (h, w), and with a padding mask its layout, attention mask and placed positional
        embedding (else ``None, None`` and the embedding interpolated to the grid)."""
        visual = self.clip.visual
        ps = visual.patch_size
        grid = (images.shape[-2] // ps, images.shape[-1] // ps)
        layout, attn_mask, pos_embed = None, None, None
        if padding_mask is not None:
            layout = padding_layout(padding_mask.to(images.device), ps)
            attn_mask = key_padding_attn_mask(layout.key_padding, images.dtype)
            pos_embed = placed_pos_embed(visual, layout, grid)
        else:
            pos_embed = visual.interpolate_pos_embed(*grid, mode="bilinear", round_fp16=False)
        return grid, layout, attn_mask, pos_embed


def _grouped_gradcam(visual: Any, last: torch.Tensor, grid: tuple[int, int], make_target_fn: Any,
                     pairs: torch.Tensor, attn_mask: Optional[torch.Tensor], create_graph: bool,
                     need_attention: bool, mode: str) -> LastBlockGradCAM:
    """Last-block GradCAM of the ``(P, 2)`` ``pairs`` of ``last`` ``(B, L, C)``: the batch taken whole
    (``mode="vmap"``) or image by image (``"loop"``).

    Sequential VJPs (CPU) run on one image at a time: a VJP through the whole batch would spend most of its
    work on the other images' (zero) gradients; batched VJPs (GPU) take the batch.
    """
    b = last.shape[0]
    groups = [(0, b)] if mode == "vmap" else [(i, i + 1) for i in range(b)]
    results = []
    for lo, hi in groups:
        sel = (pairs[:, 0] >= lo) & (pairs[:, 0] < hi)
        local = pairs[sel] - torch.tensor([lo, 0], dtype=pairs.dtype, device=pairs.device)
        results.append(last_block_gradcam(
            visual, last[lo:hi], grid, make_target_fn(lo, hi), local,
            attn_mask=None if attn_mask is None else attn_mask[lo:hi], create_graph=create_graph,
            # the explicit attention path also when only the second-order graph needs it: torch's
            # fused attention kernels have no double backward
            vjp_mode=mode, need_attention=need_attention or create_graph,
        ))
    return LastBlockGradCAM(
        cams=torch.cat([r.cams for r in results]), grad_weights=torch.cat([r.grad_weights for r in results]),
        targets=torch.cat([r.targets for r in results]), activation=torch.cat([r.activation for r in results]),
        attention=torch.cat([r.attention for r in results]) if results[0].attention is not None else None,
    )
