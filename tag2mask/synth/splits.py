"""Deterministic, disjoint train/val/test splits of the synthetic world.

Sample ``i`` of split ``s`` is generated from seed ``SPLIT_OFFSETS[s] + base_seed + i``. Offsets are
10 million apart, so as long as ``base_seed + n <= SPLIT_STRIDE`` the seed ranges (hence the images)
of different splits never overlap; this is checked.
"""

from __future__ import annotations

from typing import Any, Iterator

from tag2mask.synth.scenes import SceneSample, generate_scene

SPLIT_STRIDE = 10_000_000
SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": SPLIT_STRIDE, "test": 2 * SPLIT_STRIDE}


def seed_for(split: str, index: int, base_seed: int = 0) -> int:
    """Seed of sample ``index`` in ``split``; raises ``ValueError`` if it would leave the split's range."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_OFFSETS)}")
    local = base_seed + index
    if not 0 <= local < SPLIT_STRIDE:
        raise ValueError(f"base_seed + index = {local} outside [0, {SPLIT_STRIDE}); splits would overlap")
    return SPLIT_OFFSETS[split] + local


def generate_split(
    split: str, n: int, size: int = 224, base_seed: int = 0, **scene_kwargs: Any
) -> Iterator[SceneSample]:
    """Yield the ``n`` samples of ``split`` in order; ``scene_kwargs`` go to :func:`generate_scene`."""
    seed_for(split, max(n - 1, 0), base_seed)  # validate the whole range up front
    for i in range(n):
        yield generate_scene(seed_for(split, i, base_seed), size, **scene_kwargs)


class SyntheticDataset:
    """Torch-free indexable dataset: ``ds[i]`` regenerates sample ``i`` deterministically (no cache).

    Works as a ``torch.utils.data.Dataset`` (duck typing) and is cheap to pickle for worker processes.
    """

    def __init__(self, split: str, n: int, size: int = 224, base_seed: int = 0, **scene_kwargs: Any) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        seed_for(split, max(n - 1, 0), base_seed)
        self.split = split
        self.n = int(n)
        self.size = int(size)
        self.base_seed = int(base_seed)
        self.scene_kwargs = dict(scene_kwargs)

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.split} split of {self.n}")
        return i

    def seed(self, i: int) -> int:
        """Generation seed of item ``i``."""
        return seed_for(self.split, self._index(i), self.base_seed)

    def image_id(self, i: int) -> str:
        """Stable id ``<split>_<index:06d>`` used by the VOC exporter."""
        return f"{self.split}_{self._index(i):06d}"

    def __getitem__(self, i: int) -> SceneSample:
        return generate_scene(self.seed(i), self.size, **self.scene_kwargs)

    def __iter__(self) -> Iterator[SceneSample]:
        for i in range(self.n):
            yield self[i]

    def __repr__(self) -> str:
        return f"SyntheticDataset(split={self.split!r}, n={self.n}, size={self.size}, base_seed={self.base_seed})"
