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
A resumed run continues with the recipe stored in its checkpoint (:meth:`TrainTask.adopt_config`, the one
place that rule lives). The iteration loop itself is :class:`tag2mask.engine.steps.TrainLoop`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from tag2mask.config import changed_keys, json_ready
from tag2mask.engine.logs import TrainLog, read_events
from tag2mask.engine.steps import TrainingDiverged, TrainLoop, open_tensorboard, write_config
from tag2mask.engine.steps import gather as _gather
from tag2mask.jobs.checkpoint import DiskFullError, is_disk_full, remove_stale_temp_files
from tag2mask.runs.layout import RunFolderError, clear_run, prepare_run_folder, read_run_checkpoint
from tag2mask.runs.rng_state import restore_rng_state

__all__ = ["RunOptions", "TrainContext", "TrainTask", "TrainingDiverged", "train"]


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
    #: the recipe's dataclass (``from_dict`` / ``to_dict``, see :mod:`tag2mask.config`), held in ``self.config``:
    #: a resumed run continues with the recipe stored in its checkpoint. ``None``: the recipe cannot change
    #: on resume (a different stored one is refused).
    recipe_type: Optional[type] = None
    max_grad_norm: Optional[float] = None
    find_unused_parameters: bool = False
    accumulation_steps: int = 1

    # -- the recipe ------------------------------------------------------------------------------
    @property
    def max_iters(self) -> int:
        """Total iterations of the schedule."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """The recipe as JSON-able data (``config.json`` and every checkpoint; default: ``self.config.to_dict()``)."""
        if self.recipe_type is None:
            raise NotImplementedError
        return self.config.to_dict()

    def use_recipe(self, recipe: Any) -> None:
        """Continue with ``recipe`` (a ``recipe_type`` read from a checkpoint). Tasks that copy recipe fields
        into attributes (``max_grad_norm`` ...) extend this."""
        self.config = recipe

    def adopt_config(self, saved: dict[str, Any], announce: bool = True) -> None:
        """On resume: continue with the recipe stored in the checkpoint (the engine calls it, tasks do not).

        With a ``recipe_type`` the stored recipe wins (``announce``: print which keys differ from the one
        given now); without one a different stored recipe is refused.
        """
        current = json_ready(self.config_dict())
        if self.recipe_type is None:
            if json.loads(json.dumps(saved)) != json.loads(json.dumps(current)):
                diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
                raise RunFolderError(f"the checkpoint was trained with different settings ({', '.join(diff)}); "
                                     "resume with the same settings or start a new run")
            return
        self.use_recipe(self.recipe_type.from_dict(saved))
        changed = changed_keys(current, json_ready(self.config_dict()))
        if changed and announce:
            print(f"resume: using the recipe stored in the checkpoint (it differs in {', '.join(changed)})")

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
        """This rank's batches of iterations ``start .. end-1`` (position-based, see engine.data_stream)."""
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


def train(task: TrainTask, options: RunOptions) -> dict[str, Any]:
    """Run (or resume) ``task`` as ``options`` say; returns a summary (last row, val scores, checkpoints)."""
    from tag2mask.jobs.distributed import barrier, dist_info, init_distributed, shutdown

    if options.stop_at is not None and not 1 <= options.stop_at <= task.max_iters:
        # a stop point past the end would be silently the end: say so instead
        raise ValueError(f"--stop-at {options.stop_at} is outside the run's 1..{task.max_iters} iterations "
                         "(--iters); leave it out to train to the end")
    info = dist_info()
    device = _resolve_device(options.device, info.local_rank, info.world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    created = init_distributed(info, backend=backend)
    try:
        summary = _run(task, options, info.rank, info.world_size, device, backend)
        # every rank leaves its last collective before any rank tears gloo down: destroying the group while
        # a peer is still inside one aborted that peer ("terminate called without an active exception")
        barrier()
        return summary
    finally:
        shutdown(created)


def _run(task: TrainTask, options: RunOptions, rank: int, world: int, device: torch.device,
         backend: str) -> dict[str, Any]:
    from tag2mask.runtime import resolve_dtype, seed_everything

    out = Path(options.out_dir)
    hint = f"continue with: {options.resume_command}" if options.resume_command else "rerun the same command with --resume"
    resume_path = _agree_on_run_folder(out, options, rank, world)
    ckpt = read_run_checkpoint(resume_path, task.name) if resume_path is not None else None
    seed = options.seed if ckpt is None else _adopt_checkpoint_recipe(task, ckpt, resume_path, options.seed, rank)

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
    start = 0 if ckpt is None else _restore_checkpoint(task, ckpt, resume_path, opt, scaler, rank, world)
    end = task.max_iters if options.stop_at is None else min(task.max_iters, options.stop_at)

    logs: tuple[Any, Any, Any] = (None, None, None)
    if rank == 0:
        logs = _open_logs(out, task, options, seed, hint, start, resume_path if ckpt is not None else None,
                          world, device)
    _gather(None, world)  # the folder exists before any rank reads from it
    custom_stop = type(task).should_stop is not TrainTask.should_stop
    return TrainLoop(task, ctx, opt, scaler, options, seed, hint, logs).run(start, end, custom_stop)


def _agree_on_run_folder(out: Path, options: RunOptions, rank: int, world: int) -> Optional[Path]:
    """The checkpoint to resume from (None: a fresh run). Only rank 0 looks at the folder; nobody writes
    before every rank knows the verdict."""
    verdict: Any = None
    if rank == 0:
        try:
            verdict = ("ok", prepare_run_folder(out, options.resume, options.overwrite))
        except (RunFolderError, FileNotFoundError) as exc:
            verdict = ("error", str(exc))
    verdict = _gather(verdict, world)[0]
    if verdict[0] == "error":
        raise RunFolderError(verdict[1])
    return verdict[1]


def _adopt_checkpoint_recipe(task: TrainTask, ckpt: dict[str, Any], resume_path: Path, seed: int, rank: int) -> int:
    """Resume uses the stored recipe and seed (said once, here); returns the run's seed."""
    if not ckpt.get("resumable", True):
        raise RunFolderError(f"{resume_path}: an inference-only checkpoint (no optimiser state); it cannot be resumed")
    stored_seed = int(ckpt["options"].get("seed", seed))
    if stored_seed != seed and rank == 0:
        print(f"resume: using the seed of the run ({stored_seed}), not {seed}")
    task.adopt_config(ckpt["config"], announce=rank == 0)
    return stored_seed


def _restore_checkpoint(task: TrainTask, ckpt: dict[str, Any], resume_path: Path, opt: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, rank: int, world: int) -> int:
    """Load the modules, optimiser, scaler, extra state and this rank's RNG state; returns the iteration."""
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
    return start


def _open_logs(out: Path, task: TrainTask, options: RunOptions, seed: int, hint: str, start: int,
               resume_path: Optional[Path], world: int, device: torch.device) -> tuple[Any, Any, Any]:
    """Rank 0: prepare the folder (``config.json``, stale temporary files) and open the train / val logs
    and TensorBoard; ``resume_path`` is the checkpoint resumed from (None: a fresh start)."""
    try:
        if options.overwrite:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temp_files(out)
        if stale:
            print(f"removed {len(stale)} temporary file(s) a killed process left in {out}")
        write_config(out, task, options, seed)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(getattr(exc, "filename", None) or out, hint) from None
        raise
    session = sum(1 for e in read_events(out / "train_log.jsonl") if e.get("event") in ("start", "resume"))
    train_log = TrainLog(out, "train_log", session, hint)
    val_log = TrainLog(out, "val_log", session, hint)
    if resume_path is not None:
        train_log.event("resume", from_iteration=start, checkpoint=str(resume_path), world_size=world)
        print(f"resuming {out} from iteration {start} ({resume_path.name})")
    else:
        if options.resume == "auto":
            print(f"nothing to resume in {out} yet: starting at iteration 0")
        train_log.event("start", world_size=world, device=str(device))
    return train_log, val_log, open_tensorboard(out, options.tensorboard, start)
