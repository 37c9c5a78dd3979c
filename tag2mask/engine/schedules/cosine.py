"""Constant warm-up, then cosine annealing: the learning rate as a pure function of the iteration.

This is what ``SequentialLR([LinearLR(start_factor=f, end_factor=f, total_iters=W),
CosineAnnealingLR(T_max=max_iters - W, eta_min)], milestones=[W])`` produces when the scheduler is
stepped once after every optimiser step (FMA-WSSS's prompt training: f = 0.01, W = 500, base 1e-3):

    t <  W:   lr = base * f                                   (flat: start and end factors are equal)
    t >= W:   lr = eta_min + (base - eta_min) * (1 + cos(pi * (t - W) / (max_iters - W))) / 2

torch computes the cosine part recursively; the closed form above agrees with it to ~1e-14
relative, and, unlike the recursion, it can be evaluated at any iteration (exact resume, any
training loop). The last iteration's lr is small but not 0 (t = max_iters - 1 < max_iters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["warmup_cosine_lr", "WarmupCosineSchedule"]


def warmup_cosine_lr(
    iteration: int,
    *,
    base_lr: float,
    max_iters: int,
    warmup_iters: int = 0,
    warmup_factor: float = 1.0,
    eta_min: float = 0.0,
) -> float:
    """Learning rate of the optimiser step at 0-based ``iteration`` (see the module docstring).

    Iterations past ``max_iters`` continue the cosine (as torch's scheduler would); callers stop
    at ``max_iters``.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if not 0 <= warmup_iters < max_iters:
        raise ValueError(f"need 0 <= warmup_iters < max_iters, got {warmup_iters} and {max_iters}")
    if iteration < warmup_iters:
        return base_lr * warmup_factor
    t = iteration - warmup_iters
    period = max_iters - warmup_iters
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t / period)) / 2


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """:func:`warmup_cosine_lr` with its settings bound; ``apply`` sets every param group's lr."""

    base_lr: float
    max_iters: int
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    eta_min: float = 0.0

    def lr(self, iteration: int) -> float:
        return warmup_cosine_lr(
            iteration, base_lr=self.base_lr, max_iters=self.max_iters, warmup_iters=self.warmup_iters,
            warmup_factor=self.warmup_factor, eta_min=self.eta_min,
        )

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set the lr of every group for the step at ``iteration`` (call before ``optimizer.step()``)."""
        lr = self.lr(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
