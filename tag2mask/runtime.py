"""Device resolution and seeding shared by the library and every command.

torch and NumPy are imported inside the functions: the CLI imports this module to build its
parser (``DEVICE_CHOICES``), and ``tag2mask --help`` must not pay for torch.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a ``torch.device``; ``auto`` picks CUDA when present.

    Raises ``ValueError`` when CUDA is asked for and is not available, instead of failing later
    inside a kernel.
    """
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """Map ``fp32|bf16|fp16`` (or ``None``) to the autocast dtype; ``fp32`` means no autocast."""
    import torch

    if name is None or name in ("fp32", "float32"):
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown precision {name!r}; choose fp32, bf16 or fp16")
    return table[name]
