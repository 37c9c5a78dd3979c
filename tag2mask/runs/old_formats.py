"""Re-save a checkpoint of an older tag2mask (pickled format ``tag2mask-weclip-v1``) in the safe format.

The old WeCLIP checkpoints stored NumPy's RNG state as a NumPy array, which ``weights_only=True``
refuses. They are read here with ``torch.load(weights_only=True)`` plus a few allow-listed
globals that rebuild plain NumPy arrays (``numpy.ndarray``, its reconstructor, ``numpy.dtype`` and
the numeric dtype classes):
still no arbitrary class, function or ``__reduce__`` call can run, so a crafted file fails the same
way it fails everywhere else. The result is an engine checkpoint (``tag2mask-train-v2``) in a new run
folder, resumable bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from tag2mask.jobs.checkpoint import RECORD, UnsafeCheckpointError, honour_umask, save_checkpoint
from tag2mask.io.torch_files import UnsafeFileError, safe_torch_load
from tag2mask.runs.layout import CHECKPOINT_FORMAT, RunFolderError
from tag2mask.runs.rng_state import rng_state_as_tensors

__all__ = ["LEGACY_WECLIP_FORMAT", "read_legacy_checkpoint", "resave_legacy_checkpoint"]

LEGACY_WECLIP_FORMAT = "tag2mask-weclip-v1"


def _numpy_array_globals() -> list[Any]:
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    numeric = (np.bool_, np.uint8, np.int32, np.uint32, np.int64, np.float32, np.float64)
    return [_reconstruct, np.ndarray, np.dtype, *(type(np.dtype(t)) for t in numeric)]


def read_legacy_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Load an old pickled tag2mask checkpoint without executing anything (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = safe_torch_load(path, "tag2mask checkpoint", extra_globals=_numpy_array_globals())
    except UnsafeFileError as exc:
        raise UnsafeCheckpointError(str(exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != LEGACY_WECLIP_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of an older tag2mask (format {LEGACY_WECLIP_FORMAT})")
    return ckpt


def resave_legacy_checkpoint(path: Union[str, Path], out_dir: Union[str, Path], overwrite: bool = False) -> Path:
    """Convert an old WeCLIP checkpoint into a run folder ``out_dir``; returns the new checkpoint path."""
    old = read_legacy_checkpoint(path)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunFolderError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if overwrite and (out / RECORD).is_file():
        (out / RECORD).unlink()
    optimizer = dict(old["optimizer"])
    schedule = optimizer.pop("poly_warmup", None)  # the engine sets the lr from the iteration
    if schedule is not None:
        optimizer["param_groups"] = [{**g, "initial_lr": float(lr)}
                                     for g, lr in zip(optimizer["param_groups"], schedule["initial_lrs"])]
    rng = [rng_state_as_tensors(s["python"], s["numpy"], s["torch"], s.get("cuda")) for s in old["rng"]]
    train_options = dict(old.get("train_options") or {})
    payload = {
        "format": CHECKPOINT_FORMAT, "task": "weclip", "iteration": int(old["iteration"]),
        "world_size": int(old.get("world_size", len(rng))), "resumable": True,
        "config_json": json.dumps(old["config"]),
        "options_json": json.dumps({"seed": train_options.get("seed", 1), **{
            k: v for k, v in train_options.items() if isinstance(v, (str, int, float, bool, type(None)))}}),
        "meta_json": json.dumps({"clip": dict(old.get("clip") or {}), "resaved_from": str(path)}),
        "modules": {"decoder": old["decoder"]},
        "optimizer": optimizer,
        "scaler": old.get("scaler") or {},
        "rng": rng,
        "extra": {},
    }
    saved = save_checkpoint(out, payload["iteration"], payload, name=f"ckpt_{payload['iteration']:07d}.pt")
    config = {"task": "weclip", "config": old["config"], "options": train_options, "meta": json.loads(payload["meta_json"])}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    honour_umask(out / "config.json")
    return saved
