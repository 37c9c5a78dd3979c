"""The iteration loop of the training engine (:func:`tag2mask.engine.loop.train` runs it).

:class:`TrainLoop` owns one session's iterations: the learning rate of each step, the micro-batches
and their backward passes, the gradient step, and after each step the log row, the validation and
the checkpoint that fall due. The helpers below it write ``config.json``, the log rows and the
checkpoints. Tasks and options are the engine's :class:`~tag2mask.engine.loop.TrainTask` and
:class:`~tag2mask.engine.loop.RunOptions` (typed ``Any`` here: this module is imported by the
engine, not the other way round).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from tag2mask.jobs.checkpoint import DiskFullError, is_disk_full, save_checkpoint
from tag2mask.runs.layout import CHECKPOINT_FORMAT
from tag2mask.runs.rng_state import capture_rng_state

__all__ = ["TrainLoop", "TrainingDiverged", "gather", "write_config", "open_tensorboard"]


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


def gather(obj: Any, world: int) -> list[Any]:
    """Every process's ``obj`` (small, picklable), in rank order (``[obj]`` in one process)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _apply_lr(opt: torch.optim.Optimizer, mult: Union[float, Sequence[float]]) -> None:
    mults = [mult] * len(opt.param_groups) if isinstance(mult, (int, float)) else list(mult)
    if len(mults) != len(opt.param_groups):
        raise ValueError(f"lr_multiplier gave {len(mults)} values for {len(opt.param_groups)} parameter groups")
    for group, m in zip(opt.param_groups, mults):
        group["lr"] = group["initial_lr"] * m


class TrainLoop:
    """One session of iterations ``start .. end-1`` of a task (see the module docstring).

    ``logs``: rank 0's ``(train_log, val_log, tensorboard writer or None)``; ``(None, None, None)`` elsewhere.
    """

    def __init__(self, task: Any, ctx: Any, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 options: Any, seed: int, hint: str, logs: tuple[Any, Any, Any]) -> None:
        self.task, self.ctx, self.opt, self.scaler, self.options = task, ctx, opt, scaler, options
        self.seed, self.hint = seed, hint
        self.train_log, self.val_log, self.tb = logs
        self.rank, self.world, self.out = ctx.rank, ctx.world_size, ctx.out_dir
        self.bar: Any = None
        self.window = _Window()
        self.tic = 0.0

    def run(self, start: int, end: int, custom_stop: bool) -> dict[str, Any]:
        """Train iterations ``start .. end-1`` (``custom_stop``: ask the task's ``should_stop`` before each)."""
        task, options = self.task, self.options
        summary: dict[str, Any] = {"start_iteration": start, "iterations": start, "checkpoints": [], "val": [],
                                   "out_dir": str(self.out)}
        self.summary = summary
        if options.progress and self.rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=end, initial=start, desc=task.name, dynamic_ncols=True)
        for module in task.modules().values():
            module.train()
        self.tic = time.perf_counter()
        done = start
        try:
            for it, batch in zip(range(start, end), task.batches(start, end)):
                if custom_stop and gather(bool(task.should_stop(it)), self.world)[0]:  # rank 0 decides for all
                    summary["stopped_by_task"] = True
                    break
                self.window.add(self._step(batch, it))
                done = it + 1
                self._after_step(done, end)
            if summary.get("stopped_by_task") and done > start and done % max(1, options.ckpt_every):
                summary["checkpoints"].append(self._save(done))
        except OSError as exc:
            if is_disk_full(exc) and not isinstance(exc, DiskFullError):
                raise DiskFullError(getattr(exc, "filename", None) or self.out, self.hint) from None
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.tb is not None:
                self.tb.close()
        if self.train_log is not None:
            self.train_log.event("stop", iteration=summary["iterations"])
        if summary["iterations"] >= task.max_iters or summary.get("stopped_by_task"):
            task.finish(summary)
        return summary

    def _step(self, batch: Any, it: int) -> dict[str, Any]:
        """One optimiser step on ``batch`` (its micro-batches' losses back-propagated first); its logged values."""
        task, opt, scaler = self.task, self.opt, self.scaler
        _apply_lr(opt, task.lr_multiplier(it))
        parts = _micro_batches(task, batch)
        opt.zero_grad(set_to_none=True)
        values: dict[str, Any] = {}
        for part in parts:
            part_values = task.step(part, it)
            loss = part_values["loss"]
            if not scaler.is_enabled() and not bool(torch.isfinite(loss.detach())):
                checkpoints = self.summary["checkpoints"]
                raise TrainingDiverged(
                    f"the loss is {float(loss.detach())} at iteration {it + 1}; training stopped (newest checkpoint: "
                    f"{checkpoints[-1] if checkpoints else 'none from this session'}). "
                    "Lower the learning rate or check the labels")
            scaler.scale(loss if len(parts) == 1 else loss / len(parts)).backward()
            values = part_values if len(parts) == 1 else _merge_micro(values, part_values, len(parts))
        if task.max_grad_norm is not None:
            scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, task.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        return values

    def _after_step(self, done: int, end: int) -> None:
        """The log row, validation and checkpoint due after ``done`` iterations."""
        options, summary = self.options, self.summary
        if done % max(1, options.log_every) == 0 or done == end:
            self._log(done)
        if options.val_every > 0 and done % options.val_every == 0:
            self._validate(done)
        if done % max(1, options.ckpt_every) == 0 or done == end:
            summary["checkpoints"].append(self._save(done))
        summary["iterations"] = done
        if self.bar is not None:
            self.bar.update(1)

    def _log(self, done: int) -> None:
        now = time.perf_counter()
        row = _log_row(self.ctx, self.window, done, self.opt, (now - self.tic) / self.window.count)
        self.tic = now
        self.summary["last"] = row
        if self.train_log is not None:
            self.train_log.row(row)
            if self.tb is not None:
                for k, v in row.items():
                    if k not in ("iteration", "session") and isinstance(v, (int, float)):
                        self.tb.add_scalar(f"train/{k}", v, done)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")

    def _validate(self, done: int) -> None:
        scores = self.task.validate(done)
        if not scores:
            return
        self.summary["val"].append({"iteration": done, **scores})
        if self.val_log is not None:
            self.val_log.row({"iteration": done, **scores})
            if self.tb is not None:
                for k, v in scores.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"val/{k}", v, done)

    def _save(self, done: int) -> str:
        return _save(self.task, self.opt, self.scaler, self.options, self.seed, done, self.rank, self.world,
                     self.out, self.hint)


def _micro_batches(task: Any, batch: Any) -> list[Any]:
    steps = int(getattr(task, "accumulation_steps", 1) or 1)
    if steps == 1:
        return [batch]
    parts = list(batch)
    if len(parts) != steps:
        raise ValueError(f"{task.name}: accumulation_steps is {steps} but a batch has {len(parts)} micro-batches")
    return parts


def _merge_micro(acc: dict[str, Any], values: dict[str, Any], n: int) -> dict[str, Any]:
    """Running micro-batch mean of the tensor values (detached); other values keep the last one."""
    out = dict(acc)
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            v = v.detach() / n
            out[k] = out[k] + v if isinstance(out.get(k), torch.Tensor) else v
        else:
            out[k] = v
    return out


class _Window:
    """Logged values since the previous log row: tensors are averaged, other values keep the last one."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.last: dict[str, Any] = {}
        self.count = 0

    def add(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().reshape(())
                self.sums[k] = self.sums[k] + v if k in self.sums else v
            else:
                self.last[k] = v
        self.count += 1

    def take(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        means = {k: v / self.count for k, v in self.sums.items()}
        last = dict(self.last)
        self.sums, self.last, self.count = {}, {}, 0
        return means, last


def write_config(out: Path, task: Any, options: Any, seed: int) -> None:
    from tag2mask.io.atomic import atomic_write_text

    record = {"task": task.name, "config": task.config_dict(), "options": {**asdict(options), "seed": seed},
              "meta": task.checkpoint_meta()}
    atomic_write_text(out / "config.json", json.dumps(record, indent=2, default=str))


def _log_row(ctx: Any, window: _Window, done: int, opt: torch.optim.Optimizer,
             sec_per_it: float) -> dict[str, Any]:
    means, last = window.take()
    row: dict[str, Any] = {"iteration": done}
    if means:
        stacked = ctx.all_reduce_sum(torch.stack(list(means.values()))) / ctx.world_size
        row.update({k: float(v) for k, v in zip(means, stacked.tolist())})
    row.update(last)
    row["lr"] = opt.param_groups[0]["lr"]
    row["sec_per_it"] = round(sec_per_it, 6)
    return row


def _save(task: Any, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, options: Any,
          seed: int, done: int, rank: int, world: int, out: Path, hint: str) -> str:
    rng = gather(capture_rng_state(), world)
    status: Any = ("ok", None)
    if rank == 0:
        payload = {
            "format": CHECKPOINT_FORMAT, "task": task.name, "iteration": done, "world_size": world,
            "resumable": True,
            "config_json": json.dumps(task.config_dict()),
            "options_json": json.dumps({**asdict(options), "seed": seed}, default=str),
            "meta_json": json.dumps(task.checkpoint_meta()),
            "modules": task.state_dicts(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": rng,
            "extra": task.extra_state(),
        }
        try:
            path = save_checkpoint(out, done, payload, name=f"ckpt_{done:07d}.pt", keep_last=options.keep_last,
                                   resume_hint=hint)
            status = ("ok", str(path))
        except DiskFullError as exc:
            status = ("disk_full", str(exc))
    status = gather(status, world)[0]
    if status[0] == "disk_full":
        raise DiskFullError(out, message=status[1])
    return status[1]


def open_tensorboard(out: Path, mode: str, start: int) -> Any:
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if mode == "on":
            raise ImportError("--tensorboard on needs the tensorboard package (pip install tensorboard)")
        return None
    return SummaryWriter(str(out / "tb"), purge_step=start + 1)
