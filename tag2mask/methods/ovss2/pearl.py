"""PEARL (CVPR 2026): Procrustes-aligned last-block attention and text-aware Laplacian propagation.

What the official code (PGSmall/PEARL @ c26062b, NACLIP-derived) computes (golden arrays:
``tests/data/ovss2``; description in ``docs/open_vocabulary.md``):

* :class:`PearlBlock`: the last block in NACLIP's ``reduced`` form (``out_proj`` of the attention
  only, no residual, no FFN) with attention ``softmax(s q (k R)ᵀ + α s k_c k_cᵀ)``: ``R`` the polar
  factor (Newton-Schulz, :func:`polar_factor`) of ``k_cᵀ q_c`` with q/k centred by |q|-weighted means
  (CLS weight 0), the rotated keys *uncentred*, the key-key term on centred keys; float32 always.
* :func:`text_laplacian_propagation` (TLP): a confidence-weighted screened Laplacian smoothing of
  the full-resolution logits on an average-pooled grid, edges gated by image gradients and by text
  agreement, solved with 25 conjugate-gradient steps from the logits (no convergence test: the
  published numbers come from these 25 steps). The text matrix enters only through its diagonal,
  as the released code's ``einsum('cc,...')`` does (the paper writes pᵀ S p with the full matrix).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tag2mask.clip.layers import ResidualAttentionBlock

__all__ = ["polar_factor", "pa_attention_weights", "PearlBlock", "tlp_text_matrix", "text_laplacian_propagation"]

_TLP_TAU, _TLP_DIAG, _TLP_EDGE, _TLP_ITERS, _TLP_EPS = 0.5, 10.0, 5.0, 25, 1e-6


def polar_factor(m: torch.Tensor, iters: int = 5, eps: float = 1e-6) -> torch.Tensor:
    """``M (MᵀM)^-½`` by coupled Newton-Schulz on ``MᵀM / ‖MᵀM‖_F + eps I``: ``(B, d, d)`` -> ``(B, d, d)``."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)
    a = m.transpose(1, 2) @ m
    norm = a.flatten(1).norm(dim=1).clamp_min(eps).view(-1, 1, 1)
    y, z = a / norm + eps * eye, eye.clone()
    for _ in range(iters):  # a fixed number of matrix iterations, not a loop over tokens
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return m @ (z / norm.sqrt())


def pa_attention_weights(q: torch.Tensor, k: torch.Tensor, alpha_kk: float = 0.08,
                         polar_iters: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """PEARL's attention of one block: q, k ``(B, heads, T, d)`` (CLS at 0) -> (weights ``(B, heads, T, T)``,
    rotations ``R`` ``(B, heads, d, d)``), float32 whatever the input dtype."""
    b, heads, t, d = q.shape
    q32, k32 = q.float().reshape(b * heads, t, d), k.float().reshape(b * heads, t, d)
    w = q32.norm(dim=2, keepdim=True)
    w[:, 0] = 0.0  # the CLS token does not enter the means
    w = w / (w.sum(dim=1, keepdim=True) + 1e-6)
    q_c = q32 - (w * q32).sum(dim=1, keepdim=True)
    k_c = k32 - (w * k32).sum(dim=1, keepdim=True)
    rot = polar_factor(k_c.transpose(1, 2) @ q_c, polar_iters)
    scale = d ** -0.5
    logits = (q32 * scale) @ (k32 @ rot).transpose(1, 2)
    if alpha_kk:
        logits = logits + alpha_kk * ((k_c @ k_c.transpose(1, 2)) * scale)
    return logits.softmax(dim=-1).view(b, heads, t, t), rot.view(b, heads, d, d)


class PearlBlock:
    """PEARL's last block (``reduced``): ``(B, 1 + h*w, C) -> (B, 1 + h*w, C)``.

    ``record``: when a dict, the first call stores ``pa_R`` (heads, d, d) and ``pa_attn``
    (heads, T, T) of the first image of its batch (the fixtures' window 0).
    """

    def __init__(self, alpha_kk: float = 0.08, polar_iters: int = 5):
        self.alpha_kk, self.polar_iters = float(alpha_kk), int(polar_iters)
        self.record: Optional[dict[str, torch.Tensor]] = None

    def __call__(self, block: ResidualAttentionBlock, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = block.attn.qkv(block.ln_1(x))
        weights, rot = pa_attention_weights(q, k, self.alpha_kk, self.polar_iters)
        if self.record is not None and "pa_R" not in self.record:
            self.record.update(pa_R=rot[0], pa_attn=weights[0])
        out = (weights @ v.float()).to(x.dtype)
        return block.attn.project_out(block.attn.merge_heads(out))

    def __repr__(self) -> str:
        return f"PearlBlock(alpha_kk={self.alpha_kk}, polar_iters={self.polar_iters})"


def tlp_text_matrix(text: torch.Tensor) -> torch.Tensor:
    """TLP's text matrix ``S`` ``(Q, Q)`` of query embeddings ``(Q, D)``: row-softmax of cosines / 0.5,
    plus 10 I, rows renormalised. TLP itself uses only its diagonal."""
    t = F.normalize(text.float(), dim=-1)
    s = (t @ t.T / _TLP_TAU).softmax(dim=1)
    s = s + _TLP_DIAG * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    return s / (s.sum(dim=1, keepdim=True) + _TLP_EPS)


def _laplacian(x: torch.Tensor, w_h: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """Weighted graph Laplacian of the 4-grid applied to ``x`` ``(1, Q, h, w)``; ``w_h`` / ``w_v`` the
    edge weights with the unused first column / row."""
    flow_h = w_h[..., 1:] * (x[..., 1:] - x[..., :-1])  # edge (i, j-1) -> (i, j)
    flow_v = w_v[..., 1:, :] * (x[..., 1:, :] - x[..., :-1, :])
    out = F.pad(flow_h, (1, 0)) - F.pad(flow_h, (0, 1))
    return out + F.pad(flow_v, (0, 0, 1, 0)) - F.pad(flow_v, (0, 0, 0, 1))


def _conjugate_gradient(apply_a, rhs: torch.Tensor, x0: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` plain CG steps for ``A x = rhs`` from ``x0``; inner products over the whole tensor."""
    x = x0.clone()
    r = rhs - apply_a(x)
    p = r.clone()
    rs = (r * r).sum()
    for _ in range(iters):
        ap = apply_a(p)
        alpha = rs / ((p * ap).sum() + 1e-12)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum()
        p = r + (rs_new / (rs + 1e-12)) * p
        rs = rs_new
    return x


def _edge_weights(gray: torch.Tensor, probs: torch.Tensor, diag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal / vertical edge weights ``(1, 1, h, w)`` (first column / row = 1, unused)."""
    gx = (gray[..., 1:] - gray[..., :-1]).abs()
    gy = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
    gx, gy = gx / (gx.mean() + _TLP_EPS), gy / (gy.mean() + _TLP_EPS)
    d = diag.view(1, -1, 1, 1)
    gate_h = (probs[..., 1:] * (d * probs[..., :-1])).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    gate_v = (probs[..., 1:, :] * (d * probs[..., :-1, :])).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    w_h = (torch.exp(-_TLP_EDGE * gx) * (1.0 + gate_h)).clamp(0.0, 1.0)
    w_v = (torch.exp(-_TLP_EDGE * gy) * (1.0 + gate_v)).clamp(0.0, 1.0)
    return F.pad(w_h, (1, 0), value=1.0), F.pad(w_v, (0, 0, 1, 0), value=1.0)


def text_laplacian_propagation(
    image: torch.Tensor, logits: torch.Tensor, text_matrix: torch.Tensor, grid: int = 80,
    record: Optional[dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """PEARL's TLP: normalised image ``(1, 3, H, W)``, logits ``(1, Q, H, W)`` -> refined ``(1, Q, H, W)`` float32.

    Pool factor per axis ``max(1, round(size / grid))`` (Python rounding, 2.5 -> 2); softmax over
    raw logits (no temperature). ``record`` receives ``tlp_agree``, ``tlp_w_h``, ``tlp_w_v``
    ``(1, Hs, Ws)`` and ``tlp_log_s`` / ``tlp_F_grid`` ``(Q, Hs, Ws)`` (the pooled logits and the CG result).
    """
    h, w = logits.shape[-2:]
    sh, sw = max(1, round(h / grid)), max(1, round(w / grid))
    img_s, log_s = image.float(), logits.float()
    if sh > 1 or sw > 1:
        img_s = F.avg_pool2d(img_s, (sh, sw), (sh, sw))
        log_s = F.avg_pool2d(log_s, (sh, sw), (sh, sw))
    diag = torch.diagonal(text_matrix).to(log_s)
    probs = log_s.softmax(dim=1)
    agree = (probs * (diag.view(1, -1, 1, 1) * probs)).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    conf_w = probs.amax(dim=1, keepdim=True).clamp_min(0.05) ** 2 * (1.0 + agree)
    gray = 0.299 * img_s[:, :1] + 0.587 * img_s[:, 1:2] + 0.114 * img_s[:, 2:3]
    w_h, w_v = _edge_weights(gray, probs, diag)
    solved = _conjugate_gradient(lambda x: conf_w * x + _laplacian(x, w_h, w_v), conf_w * log_s, log_s, _TLP_ITERS)
    if record is not None:
        record.update(tlp_agree=agree[0], tlp_w_h=w_h[0], tlp_w_v=w_v[0], tlp_log_s=log_s[0], tlp_F_grid=solved[0])
    if sh > 1 or sw > 1:
        solved = F.interpolate(solved, size=(h, w), mode="bilinear", align_corners=False)
    return solved
