"""A trained ``train segmenter`` run as a predictor: ``segment --checkpoint`` and the registry use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from tag2mask.segmenter.evaluation import predict_logits

__all__ = ["load_trained_segmenter", "TrainedSegmenter"]


def load_trained_segmenter(path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """``(network in eval mode, SegmenterConfig)`` from a ``train segmenter`` checkpoint or run folder.

    The network is rebuilt from the architecture recorded at training time (no pretrained files are
    read again) and its weights come from the checkpoint (``weights_only=True``).
    """
    from tag2mask.runs.layout import read_run_checkpoint
    from tag2mask.runtime import resolve_device
    from tag2mask.segmenter.task import SegmenterConfig, build_network

    ckpt = read_run_checkpoint(path, task="segmenter")
    config = SegmenterConfig.from_dict(ckpt["config"])
    network = ckpt["meta"].get("network") or {}
    model = build_network(config, network.get("config"))
    frozen = tuple(model.frozen_prefixes()) if hasattr(model, "frozen_prefixes") else ()
    result = model.load_state_dict(ckpt["modules"]["model"], strict=not frozen)
    missing = [k for k in getattr(result, "missing_keys", []) if not k.startswith(frozen)]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(f"{ckpt['path']}: the weights do not fit the recorded network ({missing[:3]})")
    dev = resolve_device(device) if isinstance(device, str) else device
    return model.to(dev).eval(), config


class TrainedSegmenter:
    """A ``train segmenter`` run behind ``predict(image) -> (label (H, W) uint8, probs (C, H, W) float32)``."""

    takes_classes = False  # the run brings its own classes

    @classmethod
    def from_run(cls, checkpoint: Union[str, Path], device: Union[str, torch.device] = "auto",
                 weights: Optional[str] = None, crf: bool = False,
                 classes: Optional[str] = None) -> "TrainedSegmenter":
        """The predictor of ``segment --checkpoint`` (see :data:`tag2mask.methods.registry.RUN_PREDICTORS`);
        options a `train segmenter` run does not take are errors."""
        if classes is not None:
            raise ValueError("--classes with --checkpoint applies to CLIP-ZSS students (train clip-zss); this run "
                             "brings its own classes")
        if weights is not None or crf:
            raise ValueError("--weights and --crf apply to WeCLIP checkpoints, not to a `train segmenter` run")
        return cls(checkpoint, device=device)

    def __init__(self, checkpoint: Union[str, Path], device: Union[str, torch.device] = "auto") -> None:
        self.model, self.config = load_trained_segmenter(checkpoint, device)
        self.device = next(self.model.parameters()).device
        self.class_names = tuple(self.config.class_names)
        self.has_background = bool(self.config.background)
        # the test settings, named as WeCLIPSegmenter names them (segment --checkpoint records them)
        self.long_side = self.config.test_long_side
        self.scales = tuple(self.config.test_scales)
        self.flip = bool(self.config.test_flip)

    def predict(self, image: Any) -> tuple[np.ndarray, np.ndarray]:
        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        probs = predict_logits(self.model, rgb, self.config).softmax(dim=0).cpu().numpy()
        return probs.argmax(axis=0).astype(np.uint8), probs.astype(np.float32)
