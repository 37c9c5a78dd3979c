"""The one training engine every trainer in tag2mask runs on.

A *task* (:class:`TrainTask`) says what is trained: its modules, optimiser and parameter groups, a
per-iteration learning-rate rule, a position-based data stream, the loss of one batch, optional
validation and optional extra state. The engine (:func:`train`) owns everything around it:

* the run folder: an existing run is refused unless ``resume`` or ``overwrite`` is given;
  ``config.json``; stale temporary files of a killed writer are removed on resume;
* seeding, the device (``cpu|cuda|auto``), DDP under ``torchrun`` (gloo on CPU, nccl on CUDA; the
  global batch is split over the processes), AMP (bf16, or fp16 with a gradient scaler);
* the gradient step (zero grad, backward, optional clipping, optimiser step) and a stop with a clear
  message when the loss is not finite;
* logs that are only appended (:mod:`tag2mask.engine.logs`; each row holds the means of the
  step's tensor values over the iterations since the previous row, averaged over the processes),
  tqdm progress on rank 0, periodic validation, optional TensorBoard;
* checkpoints through :mod:`tag2mask.jobs.checkpoint`: ONE file per save (``ckpt_<iter>.pt``,
  atomic, recorded with size and SHA-256), tensors and plain data only (RNG states as tensors,
  configs as JSON text), loaded with ``weights_only=True``. ``resume="auto"`` continues from the
  newest complete checkpoint; it never restarts silently from 0 and never truncates a log;
* a full disk stops the run with one line naming the file and how to continue.

Exact resume: the modules, optimiser, scaler, the task's extra state, the iteration and the RNG state
of every rank are restored, and the data stream is a function of the stream position
(:mod:`tag2mask.engine.data_stream`), so on CPU a resumed run is bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from tag2mask.jobs.checkpoint import DiskFullError, honour_umask, is_disk_full, remove_stale_temp_files, save_checkpoint
from tag2mask.engine.logs import TrainLog, read_events
from tag2mask.runs.layout import (
    CHECKPOINT_FORMAT, RunFolderError, clear_run, prepare_run_folder, read_run_checkpoint,
)
from tag2mask.runs.rng_state import capture_rng_state, restore_rng_state

__all__ = ["RunOptions", "TrainContext", "TrainTask", "TrainingDiverged", "train"]


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


@dataclass
class RunOptions:
    """How to run a training job (the recipe itself belongs to the task).

    ``resume``: ``None`` (fresh run), ``"auto"`` (newest complete checkpoint in ``out_dir``) or a
    checkpoint file / run folder. ``overwrite``: start again in an existing run folder (its
    checkpoints and logs are deleted). ``stop_at``: leave after this iteration (the schedule still
    targets the task's ``max_iters``; for preemption and time slicing). ``keep_last``: delete older
    checkpoints beyond this many (``None`` keeps all). ``tensorboard``: auto | on | off.
    ``resume_command``: shown in messages that tell the user how to continue.
    """

    out_dir: str
    resume: Optional[str] = None
    overwrite: bool = False
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 1
    stop_at: Optional[int] = None
    ckpt_every: int = 1000
    val_every: int = 0
    log_every: int = 10
    keep_last: Optional[int] = None
    num_workers: int = 0
    progress: bool = True
    tensorboard: str = "off"
    resume_command: str = ""


@dataclass
class TrainContext:
    """What a task sees of the engine: where it runs and the helpers that depend on it."""

    device: torch.device
    rank: int
    world_size: int
    amp_dtype: Optional[torch.dtype]
    out_dir: Path
    seed: int
    num_workers: int
    find_unused_parameters: bool = False
    backend: Optional[str] = None
    wrapped: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> ContextManager:
        """``torch.autocast`` at the run's precision (a no-op context in fp32)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def ddp(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped for data-parallel training under torchrun (itself in one process).

        Call the returned module's ``forward`` in :meth:`TrainTask.step` so gradients are averaged
        over the processes; keep returning the *unwrapped* module from :meth:`TrainTask.modules`.
        """
        if self.world_size == 1:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
        )

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (small, picklable), in rank order (``[obj]`` in one process)."""
        return _gather(obj, self.world_size)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the processes (a copy on ``tensor``'s device; itself in one process)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        t = tensor.detach().to(self.device if self.backend == "nccl" else "cpu").clone()
        dist.all_reduce(t)
        return t.to(tensor.device)


class TrainTask:
    """What to train. Subclasses implement the methods that raise ``NotImplementedError``.

    Attributes:
        name: stored in checkpoints (``segment --checkpoint`` and the converters dispatch on it).
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        find_unused_parameters: passed to DDP (modules whose forward skips some parameters).
        accumulation_steps: gradient accumulation: with N > 1 every item :meth:`batches` yields is
            a sequence of N micro-batches; :meth:`step` runs on each, the engine back-propagates
            each loss / N and steps the optimiser once (logged values are micro-batch means).
    """

    name: str = "task"
    max_grad_norm: Optional[float] = None
    find_unused_parameters: bool = False
    accumulation_steps: int = 1

    # -- the recipe ------------------------------------------------------------------------------
    @property
    def max_iters(self) -> int:
        """Total iterations of the schedule."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """The recipe as JSON-able data (``config.json`` and every checkpoint)."""
        raise NotImplementedError

    def adopt_config(self, saved: dict[str, Any]) -> None:
        """On resume: continue with the recipe stored in the checkpoint (default: refuse a different one)."""
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(self.config_dict())):
            diff = sorted(k for k in set(saved) | set(self.config_dict()) if saved.get(k) != self.config_dict().get(k))
            raise RunFolderError(f"the checkpoint was trained with different settings ({', '.join(diff)}); "
                                 "resume with the same settings or start a new run")

    # -- model and optimiser ---------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        """Build the modules on ``ctx.device`` (the global RNG is seeded identically on every rank)."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """The modules whose state is checkpointed (unwrapped), by name."""
        raise NotImplementedError

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        """What is checkpointed of :meth:`modules` (default: their full state dicts)."""
        return {name: m.state_dict() for name, m in self.modules().items()}

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        """Inverse of :meth:`state_dicts` (default: strict loading)."""
        for name, module in self.modules().items():
            module.load_state_dict(states[name])

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser over the trainable parameters (param groups with their base ``lr``)."""
        raise NotImplementedError

    def lr_multiplier(self, iteration: int) -> Union[float, Sequence[float]]:
        """Multiplier of each group's base lr for 0-based ``iteration`` (one value or one per group)."""
        return 1.0

    # -- data and step ---------------------------------------------------------------------------
    def batches(self, start: int, end: int) -> Iterable[Any]:
        """This rank's batches of iterations ``start .. end-1`` (position-based, see training.stream)."""
        raise NotImplementedError

    def step(self, batch: Any, iteration: int) -> dict[str, Any]:
        """Forward and loss of one batch: ``{"loss": scalar tensor with grad, other logged values ...}``.

        The engine runs backward and the optimiser step. Use ``ctx.autocast()`` around the forward
        passes that may run in reduced precision, and the DDP-wrapped modules from ``ctx.ddp``.
        """
        raise NotImplementedError

    # -- optional --------------------------------------------------------------------------------
    def validate(self, iteration: int) -> Optional[dict[str, float]]:
        """Scores on held-out data after ``iteration`` iterations (every rank calls it), or None."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """Additional state to checkpoint (tensors and plain data), e.g. a feature bank."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON-able facts inference needs besides the config (e.g. which CLIP weights were used)."""
        return {}

    def should_stop(self, iteration: int) -> bool:
        """Stop before ``iteration`` (e.g. a time budget is spent); rank 0's answer counts. Default: never."""
        return False

    def finish(self, summary: dict[str, Any]) -> None:
        """Called on every rank when the run reached ``max_iters`` or :meth:`should_stop` said stop."""


# ------------------------------------------------------------------------------------------------
# the loop


def _resolve_device(name: str, local_rank: int, world: int) -> torch.device:
    from tag2mask.runtime import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def _gather(obj: Any, world: int) -> list[Any]:
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


def train(task: TrainTask, options: RunOptions) -> dict[str, Any]:
    """Run (or resume) ``task`` as ``options`` say; returns a summary (last row, val scores, checkpoints)."""
    from tag2mask.jobs.distributed import dist_info, init_distributed, shutdown

    info = dist_info()
    device = _resolve_device(options.device, info.local_rank, info.world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    created = init_distributed(info, backend=backend)
    try:
        return _run(task, options, info.rank, info.world_size, device, backend)
    finally:
        shutdown(created)


def _run(task: TrainTask, options: RunOptions, rank: int, world: int, device: torch.device,
         backend: str) -> dict[str, Any]:
    from tag2mask.runtime import resolve_dtype, seed_everything

    out = Path(options.out_dir)
    hint = f"continue with: {options.resume_command}" if options.resume_command else "rerun the same command with --resume"
    # only rank 0 looks at the folder; nobody writes before every rank knows the verdict
    verdict: Any = None
    if rank == 0:
        try:
            verdict = ("ok", prepare_run_folder(out, options.resume, options.overwrite))
        except (RunFolderError, FileNotFoundError) as exc:
            verdict = ("error", str(exc))
    verdict = _gather(verdict, world)[0]
    if verdict[0] == "error":
        raise RunFolderError(verdict[1])
    resume_path: Optional[Path] = verdict[1]
    ckpt = read_run_checkpoint(resume_path, task.name) if resume_path is not None else None
    seed = options.seed
    if ckpt is not None:
        if not ckpt.get("resumable", True):
            raise RunFolderError(f"{resume_path}: an inference-only checkpoint (no optimiser state); it cannot be resumed")
        seed = int(ckpt["options"].get("seed", seed))
        if seed != options.seed and rank == 0:
            print(f"resume: using the seed of the run ({seed}), not {options.seed}")
        task.adopt_config(ckpt["config"])

    amp_dtype = resolve_dtype(options.precision)
    ctx = TrainContext(device=device, rank=rank, world_size=world, amp_dtype=amp_dtype, out_dir=out, seed=seed,
                       num_workers=options.num_workers, find_unused_parameters=task.find_unused_parameters,
                       backend=backend if world > 1 else None)
    seed_everything(seed)  # module initialisation is identical on every rank
    task.setup(ctx)
    opt = task.build_optimizer()
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=options.precision == "fp16")
    torch.manual_seed(seed * 1000 + rank)  # dropout streams differ per rank
    start = 0
    if ckpt is not None:
        modules = task.modules()
        if set(modules) != set(ckpt["modules"]):
            raise ValueError(f"{resume_path}: modules {sorted(ckpt['modules'])} do not match the task's {sorted(modules)}")
        task.load_state_dicts(ckpt["modules"])
        opt.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        task.load_extra_state(ckpt.get("extra") or {})
        start = int(ckpt["iteration"])
        if len(ckpt["rng"]) == world:
            restore_rng_state(ckpt["rng"][rank])
        elif rank == 0:
            print(f"resume: the checkpoint has RNG states of {len(ckpt['rng'])} processes, running {world}: "
                  "the data stream is the same, dropout draws are not")
    end = task.max_iters if options.stop_at is None else min(task.max_iters, options.stop_at)

    train_log = val_log = tb = None
    if rank == 0:
        try:
            if options.overwrite:
                clear_run(out)
            out.mkdir(parents=True, exist_ok=True)
            stale = remove_stale_temp_files(out)
            if stale:
                print(f"removed {len(stale)} temporary file(s) a killed process left in {out}")
            _write_config(out, task, options, seed)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(getattr(exc, "filename", None) or out, hint) from None
            raise
        session = sum(1 for e in read_events(out / "train_log.jsonl") if e.get("event") in ("start", "resume"))
        train_log = TrainLog(out, "train_log", session, hint)
        val_log = TrainLog(out, "val_log", session, hint)
        if ckpt is not None:
            train_log.event("resume", from_iteration=start, checkpoint=str(resume_path), world_size=world)
            print(f"resuming {out} from iteration {start} ({resume_path.name})")
        else:
            if options.resume == "auto":
                print(f"nothing to resume in {out} yet: starting at iteration 0")
            train_log.event("start", world_size=world, device=str(device))
        tb = _tensorboard(out, options.tensorboard, start)
    _gather(None, world)  # the folder exists before any rank reads from it

    summary: dict[str, Any] = {"start_iteration": start, "iterations": start, "checkpoints": [], "val": [],
                               "out_dir": str(out)}
    bar = None
    if options.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=start, desc=task.name, dynamic_ncols=True)
    for module in task.modules().values():
        module.train()
    tic = time.perf_counter()
    window = _Window()
    custom_stop = type(task).should_stop is not TrainTask.should_stop
    done = start
    try:
        for it, batch in zip(range(start, end), task.batches(start, end)):
            if custom_stop and _gather(bool(task.should_stop(it)), world)[0]:  # rank 0 decides for all
                summary["stopped_by_task"] = True
                break
            _apply_lr(opt, task.lr_multiplier(it))
            parts = _micro_batches(task, batch)
            opt.zero_grad(set_to_none=True)
            values = {}
            for part in parts:
                part_values = task.step(part, it)
                loss = part_values["loss"]
                if not scaler.is_enabled() and not bool(torch.isfinite(loss.detach())):
                    raise TrainingDiverged(
                        f"the loss is {float(loss.detach())} at iteration {it + 1}; training stopped (newest checkpoint: "
                        f"{summary['checkpoints'][-1] if summary['checkpoints'] else 'none from this session'}). "
                        "Lower the learning rate or check the labels")
                scaler.scale(loss if len(parts) == 1 else loss / len(parts)).backward()
                values = part_values if len(parts) == 1 else _merge_micro(values, part_values, len(parts))
            if task.max_grad_norm is not None:
                scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, task.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            done = it + 1
            window.add(values)

            if done % max(1, options.log_every) == 0 or done == end:
                now = time.perf_counter()
                row = _log_row(ctx, window, done, opt, (now - tic) / window.count)
                tic = now
                summary["last"] = row
                if train_log is not None:
                    train_log.row(row)
                    if tb is not None:
                        for k, v in row.items():
                            if k not in ("iteration", "session") and isinstance(v, (int, float)):
                                tb.add_scalar(f"train/{k}", v, done)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
            if options.val_every > 0 and done % options.val_every == 0:
                scores = task.validate(done)
                if scores:
                    summary["val"].append({"iteration": done, **scores})
                    if val_log is not None:
                        val_log.row({"iteration": done, **scores})
                        if tb is not None:
                            for k, v in scores.items():
                                if isinstance(v, (int, float)):
                                    tb.add_scalar(f"val/{k}", v, done)
            if done % max(1, options.ckpt_every) == 0 or done == end:
                summary["checkpoints"].append(_save(task, opt, scaler, options, seed, done, rank, world, out, hint))
            summary["iterations"] = done
            if bar is not None:
                bar.update(1)
        if summary.get("stopped_by_task") and done > start and done % max(1, options.ckpt_every):
            summary["checkpoints"].append(_save(task, opt, scaler, options, seed, done, rank, world, out, hint))
    except OSError as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(getattr(exc, "filename", None) or out, hint) from None
        raise
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
    if train_log is not None:
        train_log.event("stop", iteration=summary["iterations"])
    if summary["iterations"] >= task.max_iters or summary.get("stopped_by_task"):
        task.finish(summary)
    return summary


def _micro_batches(task: TrainTask, batch: Any) -> list[Any]:
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


def _write_config(out: Path, task: TrainTask, options: RunOptions, seed: int) -> None:
    from tag2mask.io.atomic import atomic_write_text

    record = {"task": task.name, "config": task.config_dict(), "options": {**asdict(options), "seed": seed},
              "meta": task.checkpoint_meta()}
    atomic_write_text(out / "config.json", json.dumps(record, indent=2, default=str))
    honour_umask(out / "config.json")


def _log_row(ctx: TrainContext, window: _Window, done: int, opt: torch.optim.Optimizer,
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


def _save(task: TrainTask, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, options: RunOptions,
          seed: int, done: int, rank: int, world: int, out: Path, hint: str) -> str:
    rng = _gather(capture_rng_state(), world)
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
    status = _gather(status, world)[0]
    if status[0] == "disk_full":
        raise DiskFullError(out, message=status[1])
    return status[1]


def _tensorboard(out: Path, mode: str, start: int):
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if mode == "on":
            raise ImportError("--tensorboard on needs the tensorboard package (pip install tensorboard)")
        return None
    return SummaryWriter(str(out / "tb"), purge_step=start + 1)
