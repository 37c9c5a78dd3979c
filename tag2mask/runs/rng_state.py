"""Random-number-generator states as tensors, so a checkpoint needs no pickled Python objects.

Python's ``random`` state is ``(3, 625 ints, gauss_next)``; NumPy's legacy global state is
``('MT19937', uint32[624], pos, has_gauss, cached_gaussian)``; torch's CPU and CUDA states are
already byte tensors. :func:`capture_rng_state` packs all of them into a dict of tensors that
``torch.load(weights_only=True)`` reads back; :func:`restore_rng_state` is its inverse.
"""

from __future__ import annotations

import math
import random
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "rng_state_as_tensors"]


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator this process uses, as tensors (CPU)."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = list(torch.cuda.get_rng_state_all())
    return rng_state_as_tensors(random.getstate(), np.random.get_state(legacy=True), torch.get_rng_state(), cuda)


def rng_state_as_tensors(python: tuple, numpy: tuple, torch_state: torch.Tensor,
                         cuda: Optional[list[torch.Tensor]] = None) -> dict[str, Any]:
    """Pack ``random.getstate()``, ``np.random.get_state()`` and torch states into tensors."""
    version, internal, gauss = python
    kind, keys, pos, has_gauss, cached = numpy
    if kind != "MT19937":  # pragma: no cover - numpy's legacy global generator is always MT19937
        raise ValueError(f"unexpected NumPy generator {kind}")
    state: dict[str, Any] = {
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch": torch_state.clone(),
    }
    if cuda:
        state["cuda"] = [t.clone() for t in cuda]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators from :func:`capture_rng_state`'s dict."""
    py = [int(v) for v in state["python"].tolist()]
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if math.isnan(gauss) else gauss))
    pos, has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
