"""A tiny regression task on the training engine, for the engine tests (also runnable under torchrun).

The data stream is position based (``default_rng([seed, pos])``), the model has dropout (its RNG must
be restored on resume), an extra state (a running feature mean, checkpointed through
``extra_state``), and a phase switch at ``switch_at``: from that iteration on, a frozen copy of the
model taken at the switch (a "teacher", also checkpointed) adds a consistency term.

    python -m torch.distributed.run --nproc-per-node 2 tests/_toy_tasks.py OUT [--dropout 0] ...
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from tag2mask.engine.loop import RunOptions, TrainContext, TrainTask, train
from tag2mask.engine.data_stream import position_loader

DIM = 6


class ToyData(torch.utils.data.Dataset):
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.w = np.random.default_rng(99).normal(size=(DIM,)).astype(np.float32)

    def __len__(self) -> int:  # positions are unbounded; the sampler decides
        return 1 << 30

    def __getitem__(self, pos: int):
        rng = np.random.default_rng([self.seed, int(pos)])
        x = rng.normal(size=(DIM,)).astype(np.float32)
        return torch.from_numpy(x), torch.tensor(float(x @ self.w), dtype=torch.float32)


class ToyTask(TrainTask):
    name = "toy"

    def __init__(self, iters: int = 12, batch: int = 4, dropout: float = 0.2, switch_at: Optional[int] = 6,
                 lr: float = 0.05, nan_at: Optional[int] = None) -> None:
        self.cfg = {"iters": iters, "batch": batch, "dropout": dropout, "switch_at": switch_at, "lr": lr}
        self.nan_at = nan_at
        self.phases: list[int] = []

    @property
    def max_iters(self) -> int:
        return self.cfg["iters"]

    def config_dict(self) -> dict[str, Any]:
        return dict(self.cfg)

    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.model = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(self.cfg["dropout"]), nn.Linear(16, 1))
        self.model.to(ctx.device)
        self.wrapped = ctx.ddp(self.model)
        self.feature_mean = torch.zeros(DIM)
        self.teacher: Optional[nn.Module] = None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.cfg["lr"], momentum=0.9)

    def lr_multiplier(self, iteration: int) -> float:
        return (1 - iteration / self.max_iters) ** 0.9

    def batches(self, start: int, end: int):
        return position_loader(ToyData(self.ctx.seed), start, end, self.cfg["batch"], self.ctx.rank,
                               self.ctx.world_size, seed=self.ctx.seed)

    def step(self, batch, iteration: int) -> dict[str, Any]:
        x, y = batch
        if self.cfg["switch_at"] is not None and iteration == self.cfg["switch_at"]:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        batch_mean = self.ctx.all_reduce_sum(x.sum(0)) / self.cfg["batch"]  # the same on every rank
        self.feature_mean = 0.9 * self.feature_mean + 0.1 * batch_mean
        with self.ctx.autocast():
            pred = self.wrapped(x + self.feature_mean).squeeze(1)
        loss = ((pred.float() - y) ** 2).mean()
        phase = int(self.teacher is not None)
        if self.teacher is not None:
            loss = loss + 0.1 * ((pred.float() - self.teacher(x).squeeze(1)) ** 2).mean()
        if self.nan_at is not None and iteration == self.nan_at:
            loss = loss * float("nan")
        self.phases.append(phase)
        return {"loss": loss, "phase": phase}

    def validate(self, iteration: int) -> Optional[dict[str, float]]:
        with torch.no_grad():
            self.model.eval()
            x, y = next(iter(position_loader(ToyData(self.ctx.seed + 1), 0, 1, 16)))
            err = ((self.model(x).squeeze(1) - y) ** 2).mean()
            self.model.train()
        return {"mse": float(err)}

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"feature_mean": self.feature_mean.clone()}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.feature_mean = state["feature_mean"].clone()
        if "teacher" in state:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--switch-at", type=int, default=6)
    ap.add_argument("--ckpt-every", type=int, default=4)
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-in-save", type=int, default=None,
                    help="die (os._exit, like SIGKILL) half way through writing the N-th checkpoint")
    a = ap.parse_args(argv)
    if a.kill_in_save is not None:
        import os

        import tag2mask.io.atomic as atomic

        calls = {"n": 0}
        real = atomic.atomic_path

        def dying_write(path, data):
            calls["n"] += 1
            with real(path) as tmp:
                if calls["n"] == a.kill_in_save:
                    with open(tmp, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    os._exit(137)
                tmp.write_bytes(data)

        import tag2mask.jobs.checkpoint as ck

        ck.atomic_write_bytes = dying_write
    task = ToyTask(iters=a.iters, batch=a.batch, dropout=a.dropout, switch_at=a.switch_at)
    summary = train(task, RunOptions(out_dir=a.out, device="cpu", seed=3, ckpt_every=a.ckpt_every, log_every=1,
                                     val_every=4, stop_at=a.stop_at, resume="auto" if a.resume else None,
                                     progress=False))
    print(json.dumps({"iterations": summary["iterations"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
