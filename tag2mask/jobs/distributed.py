"""Process-group helpers for batch jobs: rank/world from the environment, init, barrier, gather.

``torchrun`` (``python -m torch.distributed.run``) starts one process per rank and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Everything here
is a no-op in a plain single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``), so the same code
path serves ``tag2mask label`` and ``torchrun ... -m tag2mask label``.

Only small Python objects (counters, error strings) ever cross process boundaries: every rank
writes its own files, so the collectives below are coordination, not data movement.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["DistInfo", "dist_info", "init_distributed", "barrier", "all_gather_object", "shutdown"]

#: how long a rank may wait for the others at a barrier (a slow shard must not time out the
#: ranks that finished early); override with ``TAG2MASK_DIST_TIMEOUT_S``
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def dist_info() -> DistInfo:
    """Rank, world size and local rank from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun).

    Raises:
        ValueError: inconsistent values (rank outside ``0..world_size-1``).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: rank must be in 0..WORLD_SIZE-1")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def _dist():
    import torch.distributed as dist

    return dist


def init_distributed(info: DistInfo | None = None, backend: str | None = None) -> bool:
    """Join the process group when ``WORLD_SIZE > 1`` and none is initialised yet.

    Backend: ``backend`` argument, else ``TAG2MASK_DIST_BACKEND``, else ``nccl`` when CUDA is
    available (one GPU per local rank) and ``gloo`` otherwise.

    Returns:
        True if this call created the group (the caller should :func:`shutdown` it at the end),
        False when nothing was done (single process, or a group created by the caller's script).
    """
    info = info or dist_info()
    if not info.distributed:
        return False
    import torch

    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    if dist.is_initialized():
        return False
    backend = backend or os.environ.get("TAG2MASK_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        # object collectives on NCCL use the current CUDA device; pin one GPU per local rank
        torch.cuda.set_device(info.local_rank)
    timeout = datetime.timedelta(seconds=_env_int("TAG2MASK_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
    return True


def _active() -> bool:
    try:
        dist = _dist()
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist = _dist()
        if dist.get_backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process). Doubles as a barrier."""
    if not _active():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown(created: bool) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if created and _active():
        _dist().destroy_process_group()


def device_for_rank(device: str) -> str:
    """Under torchrun with CUDA, each local rank takes its own GPU (``cuda:LOCAL_RANK``)."""
    info = dist_info()
    if info.distributed and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    return device
