"""Official WeCLIP checkpoints (``WeCLIP_model_iter_30000.pth``) → a tag2mask run folder.

The official training script saves ``WeCLIP_model.state_dict()``: the frozen CLIP under ``encoder.*``
(OpenAI names; Conv/Linear weights in fp16 when trained on a GPU, plus the interpolated
``encoder.visual.positional_embedding_new`` of the last input), the fusion head under
``decoder_fts_fuse.*``, the transformer decoder under ``decoder.*`` and PAR's ``par.kernel`` buffer.
It is a plain dict of tensors, read here with ``weights_only=True``.

The run folder written by :func:`convert_official_weclip` holds ``clip.safetensors`` (the CLIP
weights as stored, without the stale interpolated embedding), one checkpoint with the decoder in
tag2mask's names and the recipe (VOC or COCO preset, chosen from the number of classes), and
``config.json``; ``tag2mask segment --checkpoint RUN`` and :class:`~.inference.WeCLIPSegmenter` read it.
The checkpoint is inference-only (the official file has no optimiser state).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from tag2mask.models.weclip_decoder import WeCLIPDecoder, load_official_decoder_state
from tag2mask.methods.weclip.model import WeCLIPConfig, build_clip_for, preset

__all__ = ["read_official_checkpoint", "split_official_state", "convert_official_weclip"]

_STALE_CLIP_KEYS = ("visual.positional_embedding_new",)


def read_official_checkpoint(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The official state dict (``weights_only=True``; a ``module.`` prefix and a wrapping dict are removed)."""
    from tag2mask.jobs.checkpoint import UnsafeCheckpointError, load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official WeCLIP checkpoint not found: {path}")
    try:
        obj = load_checkpoint(path)
    except UnsafeCheckpointError as exc:
        why = str(exc).split("; tag2mask never unpickles")[0]
        raise UnsafeCheckpointError(f"{why}; official WeCLIP checkpoints are plain state dicts; nothing in it was "
                                    "executed") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors (expected the official WeCLIP_model_iter_*.pth)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def split_official_state(state: dict[str, torch.Tensor], where: str = "<state>") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(CLIP state dict in OpenAI names, decoder state dict in tag2mask names)``."""
    clip = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    for key in _STALE_CLIP_KEYS:
        clip.pop(key, None)
    if not clip:
        raise ValueError(f"{where}: no encoder.* (CLIP) weights; is this an official WeCLIP checkpoint?")
    if not any(k.startswith("decoder.") for k in state):
        raise ValueError(f"{where}: no decoder.* weights; is this an official WeCLIP checkpoint?")
    try:
        decoder = load_official_decoder_state(state)
    except KeyError as exc:
        raise ValueError(f"{where}: {exc.args[0]}") from None
    return clip, decoder


def _config_for(decoder: dict[str, torch.Tensor], preset_name: Optional[str], classes: Optional[Sequence[str]],
                where: str) -> WeCLIPConfig:
    num_classes, embed_dim = decoder["classifier.weight"].shape[:2]
    depth = len({k.split(".")[1] for k in decoder if k.startswith("blocks.")})
    name = preset_name or {21: "voc", 81: "coco"}.get(int(num_classes))
    if name is None and not classes:
        raise ValueError(f"{where}: the decoder has {num_classes} classes (not VOC's 21 or COCO's 81); "
                         "pass --classes with its foreground names")
    overrides: dict[str, Any] = {"embed_dim": int(embed_dim), "decoder_depth": depth}
    if classes:
        overrides["classes"] = tuple(classes)
    config = preset(name or "voc", **overrides)
    if config.num_classes != num_classes:
        raise ValueError(f"{where}: the decoder predicts {num_classes} classes (background included) but the "
                         f"{name or 'given'} class list has {config.num_classes}")
    return config


def convert_official_weclip(
    path: Union[str, Path], out_dir: Union[str, Path], preset_name: Optional[str] = None,
    classes: Optional[Sequence[str]] = None, overwrite: bool = False,
) -> Path:
    """Write a run folder from an official WeCLIP ``.pth``; returns the checkpoint path.

    Args:
        path: the official checkpoint.
        out_dir: the run folder to create (an existing non-empty one needs ``overwrite``).
        preset_name: ``voc`` | ``coco`` (default: from the number of classes).
        classes: foreground prompt names for other label sets.
        overwrite: replace the checkpoint of an existing converted run folder.
    """
    from tag2mask.runs.layout import RunFolderError

    path, out = Path(path), Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunFolderError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    state = read_official_checkpoint(path)
    clip_state, decoder_state = split_official_state(state, str(path))
    config = _config_for(decoder_state, preset_name, classes, str(path))

    # why: the run is written into a hidden sibling folder and moved into place only when complete, so a
    # failed conversion (bad decoder, full disk, Ctrl-C) leaves nothing that blocks its retry
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        name = _write_converted_run(staging, path, clip_state, decoder_state, config)
        _publish_run(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / name


def _write_converted_run(folder: Path, path: Path, clip_state: dict, decoder_state: dict,
                         config: WeCLIPConfig) -> str:
    """Write ``clip.safetensors``, the checkpoint and ``config.json`` of a converted run into ``folder``."""
    from safetensors.torch import save_file

    from tag2mask.jobs.checkpoint import honour_umask, save_checkpoint
    from tag2mask.runs.layout import CHECKPOINT_FORMAT

    clip_path = folder / "clip.safetensors"
    save_file({k: v.detach().contiguous() for k, v in clip_state.items()}, str(clip_path),
              metadata={"source": path.name, "format": "pt"})
    honour_umask(clip_path)
    clip = build_clip_for(config, clip_path, "cpu")  # validates the CLIP weights
    decoder = WeCLIPDecoder(in_channels=clip.visual.width, num_classes=config.num_classes,
                            num_layers=clip.visual.num_blocks - 1, embed_dim=config.embed_dim,
                            depth=config.decoder_depth, heads=config.decoder_heads)
    try:
        decoder.load_state_dict(decoder_state)  # strict: every decoder weight present, with the right shape
    except RuntimeError as exc:
        raise ValueError(f"{path}: the decoder does not fit the WeCLIP architecture ({exc})") from None

    m = re.search(r"iter_(\d+)", path.stem)
    iteration = int(m.group(1)) if m else 0
    meta = {"clip": {"weights": clip_path.name, "fingerprint": clip.fingerprint},
            "converted_from": {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
    payload = {
        "format": CHECKPOINT_FORMAT, "task": "weclip", "iteration": iteration, "world_size": 1, "resumable": False,
        "config_json": json.dumps(config.to_dict()), "options_json": "{}", "meta_json": json.dumps(meta),
        "modules": {"decoder": decoder_state}, "optimizer": {}, "scaler": {}, "rng": [], "extra": {},
    }
    saved = save_checkpoint(folder, iteration, payload, name=f"ckpt_{iteration:07d}.pt")
    (folder / "config.json").write_text(json.dumps({"task": "weclip", "config": config.to_dict(), "meta": meta},
                                                   indent=2))
    honour_umask(folder / "config.json")
    return saved.name


def _publish_run(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the complete run in ``staging`` to ``out``: one rename, or file by file into an existing ``out``."""
    from tag2mask.jobs.checkpoint import RECORD
    from tag2mask.runs.layout import RunFolderError

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)  # mkdtemp makes it 0700; the run folder is shared like any output
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        staging.rename(out)
        return
    if not overwrite:
        raise RunFolderError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    for p in out.glob("ckpt_*.pt"):
        p.unlink()
    (out / RECORD).unlink(missing_ok=True)
    for p in sorted(staging.iterdir()):
        os.replace(p, out / p.name)
