"""The tiny CLIP's training settings (read by its data sampler and its trainer)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    out: str = "runs/tiny_clip"
    steps: int = 6000
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.05
    warmup: int = 300
    grad_clip: float = 1.0
    time_budget_s: float = 0.0  # > 0: the schedule also advances with elapsed time and training stops when it is spent
    pool_size: int = 20000
    pool_workers: int = 0  # 0: os.cpu_count()
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 192
    vision_layers: int = 6
    text_width: int = 64
    text_layers: int = 3
    embed_dim: int = 128
    caption_prob: float = 0.5
    stuff_prompt_prob: float = 0.2
    w_clip: float = 1.0
    w_bce: float = 1.0
    w_dense: float = 1.0
    dense_topk: int = 4
    w_attn: float = 0.0
    attn_from_block: int = 0
    attn_tau: float = 0.1
    attn_start: float = 0.1
    bf16: bool = True
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    eval_every: int = 1000
    n_val: int = 200
    save_every: int = 1000
