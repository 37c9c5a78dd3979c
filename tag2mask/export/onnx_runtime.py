"""``tag2mask segment --onnx``: an exported graph run by onnxruntime, pre/post-processing in NumPy.

Per image (the steps of :func:`tag2mask.segmenter.evaluation.predict_logits`, read from the sidecar):
``(rgb / 255 - mean) / std``; the run's test resize (long side, or reference size keeping the aspect
ratio), or, for a fixed-size graph, a resize to the graph's size; the graph (scales and flip inside);
bilinear (``align_corners=False``) back to the image size; softmax; argmax. No torch model is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from tag2mask.export.onnx_graph import SIDECAR_FORMAT, require_onnx, sidecar_path

__all__ = ["bilinear_resize", "read_sidecar", "work_size", "OnnxSegmenter"]


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0, i1`` and weight of ``i1`` per output index (torch's ``align_corners=False``)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def bilinear_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(C, h, w)`` float32 -> ``(C, H, W)`` float32, as ``F.interpolate(mode='bilinear', align_corners=False)``."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    y0, y1, wy = _axis_weights(h, size[0])
    x0, x1, wx = _axis_weights(w, size[1])
    rows = x[:, y0] * (1 - wy)[None, :, None] + x[:, y1] * wy[None, :, None]
    return (rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx).astype(np.float32)


def read_sidecar(onnx_path: Union[str, Path]) -> dict[str, Any]:
    """The sidecar ``OUT.onnx.json`` of an exported graph (checked: format, classes, normalisation)."""
    from tag2mask.io.json_files import loads_named

    path = sidecar_path(Path(onnx_path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the sidecar of {onnx_path} is missing (written by tag2mask export --onnx)")
    meta = loads_named(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: not a tag2mask ONNX sidecar (format {SIDECAR_FORMAT})")
    if not meta.get("classes") or len(meta["normalization"]["mean"]) != 3:
        raise ValueError(f"{path}: no classes or a bad normalisation")
    return meta


def work_size(meta: dict[str, Any], h: int, w: int) -> tuple[int, int]:
    """The ``(H, W)`` a graph runs an ``h x w`` image at: its fixed size, else the run's test resize (the
    rounding of :func:`tag2mask.segmenter.evaluation.predict_logits`), else the image's own size."""
    fixed = meta["input"]["size"]
    if fixed:
        return int(fixed[0]), int(fixed[1])
    long_side, box = meta["resize"]["long_side"], meta["resize"]["reference_size"]
    if long_side:
        r = long_side / max(h, w)
        return max(1, int(h * r)), max(1, int(w * r))
    if box:
        r = min(box[0] / max(h, w), box[1] / min(h, w))
        return max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5))
    return h, w


class OnnxSegmenter:
    """An exported graph behind ``predict(image) -> (label (H, W) uint8, probs (C, H, W) float32)``
    (the interface of the trained-run predictors, so ``segment`` writes the same outputs)."""

    takes_classes = False

    def __init__(self, onnx_path: Union[str, Path], threads: Optional[int] = None) -> None:
        require_onnx()
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        self.meta = read_sidecar(self.path)
        options = ort.SessionOptions()
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            # onnxruntime does not read OMP_NUM_THREADS; honour it as torch does (a loaded machine, several workers)
            threads = int(os.environ["OMP_NUM_THREADS"]) or None
        if threads:
            options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.class_names = tuple(self.meta["classes"])
        self.has_background = bool(self.meta["has_background"])
        self.device = "cpu (onnxruntime)"
        self.kind = f"onnx:{self.meta['kind']}"
        self.long_side = self.meta["resize"]["long_side"]
        self.scales, self.flip = tuple(self.meta["test_time"]["scales"]), bool(self.meta["test_time"]["flip"])
        norm = self.meta["normalization"]
        self._mean = np.asarray(norm["mean"], dtype=np.float32)[:, None, None]
        self._std = np.asarray(norm["std"], dtype=np.float32)[:, None, None]

    def logits(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 -> ``(C, H, W)`` float32 logits at the image size."""
        h, w = rgb.shape[:2]
        x = (np.moveaxis(np.asarray(rgb, dtype=np.float32), -1, 0) / np.float32(255.0) - self._mean) / self._std
        x = bilinear_resize(x.astype(np.float32), work_size(self.meta, h, w))
        out = self.session.run(["logits"], {"image": np.ascontiguousarray(x[None])})[0][0]
        return bilinear_resize(out.astype(np.float32), (h, w))

    def predict(self, image: Any) -> tuple[np.ndarray, np.ndarray]:
        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        logits = self.logits(rgb)
        e = np.exp(logits - logits.max(axis=0, keepdims=True))
        probs = (e / e.sum(axis=0, keepdims=True)).astype(np.float32)
        return probs.argmax(axis=0).astype(np.uint8), probs
