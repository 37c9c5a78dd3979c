"""Poly learning-rate decay with a linear warm-up (the WeCLIP / AFA / ToCo recipe).

The official optimiser (``PolyWarmupAdamW``) sets the learning rate of every parameter group
*before* each update from its own step counter ``t`` (0 for the first ``step()`` call)::

    t <  warmup_iters:  mult = 1 - (1 - t / warmup_iters) * (1 - warmup_ratio)
    t <  max_iters:     mult = (1 - t / max_iters) ** power
    t >= max_iters:     the lr is left as it was (the value of t = max_iters - 1)
    lr_g = initial_lr_g * mult

The decay does **not** subtract the warm-up length, so the learning rate jumps at
``t = warmup_iters`` (VOC config: 1.96e-3 at t = 49, then 1.99667e-3 at t = 50 for the decoder group).

Three ways to use it:

* :func:`poly_warmup_multiplier` / :meth:`PolyWarmupSchedule.lr` — the pure formula;
* :meth:`PolyWarmupSchedule.lambda_lr` — a ``torch.optim.lr_scheduler.LambdaLR`` (call
  ``optimizer.step()`` then ``scheduler.step()``, the usual torch order);
* :class:`PolyWarmupAdamW` — an AdamW that applies the schedule inside ``step()`` like the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

__all__ = ["poly_warmup_multiplier", "PolyWarmupSchedule", "PolyWarmupAdamW"]


def poly_warmup_multiplier(
    step: int,
    *,
    max_iters: int,
    warmup_iters: int = 50,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
) -> float:
    """Learning-rate multiplier used by the ``step + 1``-th optimiser update.

    Args:
        step: 0-based update counter ``t``.
        max_iters: total number of iterations (30,000 VOC / 80,000 COCO in WeCLIP).
        warmup_iters: length of the linear warm-up (50).
        warmup_ratio: multiplier at ``t = 0`` (1e-6).
        power: exponent of the poly decay (1.0).

    Returns:
        The float64 multiplier. For ``step >= max_iters`` the value of ``max_iters - 1`` is returned,
        because the original optimiser stops updating the lr there (it never reaches 0).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if max_iters <= 0:
        raise ValueError(f"max_iters must be > 0, got {max_iters}")
    if step >= max_iters:
        step = max_iters - 1
    if step < warmup_iters:
        # Same operation order as the original so that float64 results are bit-identical.
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return (1 - step / max_iters) ** power


@dataclass(frozen=True)
class PolyWarmupSchedule:
    """Poly decay with linear warm-up; see the module docstring for the exact formula.

    Attributes:
        max_iters: total iterations.
        warmup_iters: warm-up length in iterations.
        warmup_ratio: multiplier at the first iteration.
        power: poly exponent.
    """

    max_iters: int
    warmup_iters: int = 50
    warmup_ratio: float = 1e-6
    power: float = 1.0

    def multiplier(self, step: int) -> float:
        """Multiplier of the initial lr at 0-based update ``step``."""
        return poly_warmup_multiplier(
            step,
            max_iters=self.max_iters,
            warmup_iters=self.warmup_iters,
            warmup_ratio=self.warmup_ratio,
            power=self.power,
        )

    def lr(self, base_lr: float, step: int) -> float:
        """Learning rate ``base_lr * multiplier(step)`` (product order as in the original)."""
        return base_lr * self.multiplier(step)

    def lambda_lr(self, optimizer: torch.optim.Optimizer, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` giving every group ``initial_lr * multiplier(t)``.

        ``LambdaLR`` computes ``base_lr * lambda(t)`` (same order as the original), so the
        learning rates are bit-identical to ``PolyWarmupAdamW``'s when ``scheduler.step()`` is called
        once after each ``optimizer.step()``.
        """
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.multiplier, last_epoch=last_epoch)

    def apply(self, optimizer: torch.optim.Optimizer, step: int, initial_lrs: Iterable[float]) -> None:
        """Set every group's ``lr`` for update ``step`` from the given initial learning rates."""
        mult = self.multiplier(step)
        for group, base in zip(optimizer.param_groups, initial_lrs):
            group["lr"] = base * mult


class PolyWarmupAdamW(torch.optim.AdamW):
    """AdamW whose ``step()`` first sets each group's lr from its own update counter.

    Behaves like the optimiser of the WeCLIP training script: the initial lr of each group is
    remembered at construction, ``lr = initial * mult(t)`` is set before the ``t``-th update
    (t from 0) and left unchanged once ``t >= max_iters``.

    Args:
        params: parameters or parameter groups (empty groups are allowed, as in WeCLIP).
        lr, weight_decay, betas, eps: AdamW settings (defaults of the VOC config).
        warmup_iters, max_iters, warmup_ratio, power: schedule settings.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        max_iters: int,
        warmup_iters: int = 50,
        warmup_ratio: float = 1e-6,
        power: float = 1.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.schedule = PolyWarmupSchedule(
            max_iters=max_iters, warmup_iters=warmup_iters, warmup_ratio=warmup_ratio, power=power
        )
        self.global_step = 0
        self.initial_lrs = [float(g["lr"]) for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """Set the scheduled lr of every group, run one AdamW update, advance the counter."""
        if self.global_step < self.schedule.max_iters:
            self.schedule.apply(self, self.global_step, self.initial_lrs)
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def state_dict(self) -> dict:
        """AdamW state plus the schedule counter and initial learning rates."""
        state = super().state_dict()
        state["poly_warmup"] = {"global_step": self.global_step, "initial_lrs": list(self.initial_lrs)}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore AdamW state and the schedule counter."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("poly_warmup", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.global_step = int(extra["global_step"])
            self.initial_lrs = [float(v) for v in extra["initial_lrs"]]
