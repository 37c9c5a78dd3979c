"""PolyWarmup schedule against ``tests/data/weclip/lr_schedule.npz`` (official PolyWarmupAdamW, VOC config)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tag2mask.engine.schedules.poly import PolyWarmupAdamW, PolyWarmupSchedule, poly_warmup_multiplier

DATA = Path(__file__).parent / "data" / "weclip"
FIXTURE = DATA / "lr_schedule.npz"


def _conditions() -> dict:
    return json.loads((DATA / "index.json").read_text())["files"]["lr_schedule.npz"]["conditions"]


def _group_lrs(cond: dict) -> list[float]:
    base = cond["base_lr"]
    # Groups as built by the training script: backbone, backbone norm (lr 0), head x10, decoder x10.
    return [base, 0.0, base * 10, base * 10]


def _schedule(cond: dict) -> PolyWarmupSchedule:
    return PolyWarmupSchedule(
        max_iters=cond["max_iter"],
        warmup_iters=cond["warmup_iter"],
        warmup_ratio=cond["warmup_ratio"],
        power=cond["power"],
    )


@pytest.mark.parametrize("steps_key,lr_key", [("steps", "lr"), ("dense_steps", "dense_lr")])
def test_formula_matches_fixture(steps_key: str, lr_key: str) -> None:
    data = np.load(FIXTURE)
    cond = _conditions()
    sched = _schedule(cond)
    bases = _group_lrs(cond)
    got = np.array([[sched.lr(b, int(t)) for b in bases] for t in data[steps_key]])
    np.testing.assert_allclose(got, data[lr_key], rtol=1e-12, atol=0)


def test_lambda_lr_and_adamw_wrapper_match_fixture() -> None:
    data = np.load(FIXTURE)
    cond = _conditions()
    steps = data["dense_steps"]
    want = {int(t): row for t, row in zip(steps, data["dense_lr"])}
    last = int(steps[steps < 200].max())

    def groups() -> list[dict]:
        p = torch.nn.Parameter(torch.zeros(1))
        return [
            {"params": [], "lr": _group_lrs(cond)[0]},
            {"params": [], "lr": 0.0, "weight_decay": 0.0},
            {"params": [], "lr": _group_lrs(cond)[2]},
            {"params": [p], "lr": _group_lrs(cond)[3]},
        ]

    # Custom optimiser wrapper: lr is set inside step(), read it back after the call.
    opt = PolyWarmupAdamW(
        groups(),
        lr=cond["base_lr"],
        weight_decay=cond["weight_decay"],
        betas=tuple(cond["betas"]),
        max_iters=cond["max_iter"],
        warmup_iters=cond["warmup_iter"],
        warmup_ratio=cond["warmup_ratio"],
        power=cond["power"],
    )
    # LambdaLR: lr of update t is the value before the t-th scheduler.step().
    opt2 = torch.optim.AdamW(groups(), lr=cond["base_lr"], weight_decay=cond["weight_decay"])
    sched = _schedule(cond).lambda_lr(opt2)
    for t in range(last + 1):
        lr_lambda = [g["lr"] for g in opt2.param_groups]
        opt.step()
        opt2.step()
        sched.step()
        if t in want:
            lr_wrapper = [g["lr"] for g in opt.param_groups]
            np.testing.assert_allclose(lr_wrapper, want[t], rtol=1e-12, atol=0)
            np.testing.assert_allclose(lr_lambda, want[t], rtol=1e-12, atol=0)


def test_warmup_jump_and_end() -> None:
    cond = _conditions()
    w, m = cond["warmup_iter"], cond["max_iter"]
    before = poly_warmup_multiplier(w - 1, max_iters=m, warmup_iters=w)
    after = poly_warmup_multiplier(w, max_iters=m, warmup_iters=w)
    assert after > before  # the decay does not subtract the warm-up length
    assert poly_warmup_multiplier(m + 10, max_iters=m) == poly_warmup_multiplier(m - 1, max_iters=m)
    with pytest.raises(ValueError):
        poly_warmup_multiplier(-1, max_iters=m)
