"""Position-based training streams: what a batch holds depends only on (seed, iteration), never on history.

Sample ``pos`` of the stream (``pos = iteration · global_batch + slot``) is item
``permutation_epoch[pos mod N]`` of the data set, with a fresh seeded permutation every epoch, and
its augmentation draws from ``numpy.random.default_rng([seed, pos])``. Nothing depends on worker
processes, the number of ranks or earlier samples, so a resumed run, or a run split over several
processes, sees exactly the batches of one uninterrupted single-process run.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

__all__ = ["EpochOrder", "PositionSampler", "position_loader"]


class EpochOrder:
    """Item index of stream position ``pos``: a seeded permutation of ``n`` items per epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self._cache: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    def __call__(self, pos: int) -> int:
        epoch, slot = divmod(int(pos), self.n)
        if not self.shuffle:
            return slot
        if self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n))
        return int(self._cache[1][slot])


class PositionSampler(torch.utils.data.Sampler[int]):
    """Stream positions of iterations ``start .. end-1`` for one rank.

    Iteration ``it`` uses positions ``it·global_batch + rank·local_batch + j`` (j < local_batch), so
    the union over ranks is the single-process batch.
    """

    def __init__(self, start: int, end: int, global_batch: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        self.start, self.end = int(start), int(end)
        self.global_batch, self.rank = int(global_batch), int(rank)
        self.local_batch = self.global_batch // int(world_size)

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.local_batch

    def __iter__(self) -> Iterator[int]:
        for it in range(self.start, self.end):
            base = it * self.global_batch + self.rank * self.local_batch
            yield from range(base, base + self.local_batch)


def position_loader(
    dataset: torch.utils.data.Dataset,
    start: int,
    end: int,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Optional[Callable[[Sequence[Any]], Any]] = None,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over ``dataset[pos]`` for the iterations ``start .. end-1`` of this rank.

    ``dataset`` is indexed by stream position (see the module docstring). The loader has its own
    generator: creating its iterator must not draw from the global RNG, or a resumed run's dropout
    stream would shift.
    """
    sampler = PositionSampler(start, end, global_batch, rank, world_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=sampler.local_batch, sampler=sampler, collate_fn=collate_fn,
        num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(int(seed)),
        persistent_workers=False,
    )
