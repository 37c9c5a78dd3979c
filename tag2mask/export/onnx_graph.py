"""ONNX export of a trained network: the graph, its sidecar, deterministic bytes.

The graph maps a normalised image ``image (1, 3, H, W) float32`` to ``logits (1, C, H, W) float32`` at the
input size, with the run's test-time scales and flip inside the graph (so onnxruntime gives what
``segment --checkpoint`` gives). What stays outside (NumPy, :mod:`tag2mask.export.onnx_runtime`): decoding,
``(rgb / 255 - mean) / std``, the run's test resize (long side / reference size), the bilinear resize of the
logits to the image, softmax and argmax. The sidecar ``OUT.onnx.json`` records all of it.

The TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) is used: it writes byte-identical
files for the same weights (the dynamo exporter, tried on torch 2.13 + onnxscript 0.7, did not: two
exports of one network differed) and exports in seconds instead of tens of seconds.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SIDECAR_FORMAT", "DEFAULT_OPSET", "ExportSpec", "TtaLogits", "MAX_RELATIVE_DIFF", "check_graph", "export_onnx", "sidecar_path",
           "require_onnx"]

SIDECAR_FORMAT = "tag2mask-onnx-v1"
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 14, 20


@dataclass
class ExportSpec:
    """What a method's export hook gives the generic ``export`` command.

    ``module``: ``(1, 3, H, W)`` normalised float32 -> ``(1, C, H, W)`` float32 logits at the input size
    (eval mode, CPU); ``class_names``: label value -> name (``C`` of them); ``mean`` / ``std``: per channel on
    0..1 RGB; ``long_side`` / ``reference_size``: the run's test resize (``None``: the image's own size);
    ``size``: the default ``(H, W)`` of a fixed-size export; ``notes``: what the graph leaves out (CRF, ...).
    """

    module: nn.Module
    kind: str
    class_names: tuple[str, ...]
    has_background: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: tuple[int, int]
    long_side: Optional[int] = None
    reference_size: Optional[tuple[int, int]] = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


class TtaLogits(nn.Module):
    """``fn``'s logits averaged over ``scales`` and a horizontal flip, each resized to the input size.

    The math of :func:`tag2mask.inference.multiscale_flip_logits` with the output size read from the input
    tensor, so that a ``--dynamic`` graph keeps it symbolic: ``(B, 3, H, W)`` -> ``(B, C, H, W)`` float32.
    """

    def __init__(self, fn: nn.Module, scales: Sequence[float] = (1.0,), flip: bool = False) -> None:
        super().__init__()
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive and not empty, got {tuple(scales)}")
        self.fn, self.scales, self.flip = fn, tuple(float(s) for s in scales), bool(flip)

    def forward(self, images: Tensor) -> Tensor:
        b, size = images.shape[0], images.shape[-2:]
        acc = []
        for s in self.scales:
            x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
            logits = self.fn(torch.cat([x, x.flip(-1)]) if self.flip else x).float()
            # same-size bilinear is the identity, so resizing always keeps H, W symbolic without changing values
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            acc.append((logits[:b] + logits[b:].flip(-1)) / 2 if self.flip else logits)
        return torch.stack(acc).mean(dim=0)


def require_onnx() -> None:
    """Fail with one clear line when the optional extra ``onnx`` is missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export and segment --onnx need {' and '.join(missing)}: pip install 'tag2mask[onnx]'")


def sidecar_path(onnx_path: Path) -> Path:
    """``m.onnx`` -> ``m.onnx.json``."""
    return onnx_path.with_name(onnx_path.name + ".json")


def _sidecar(spec: ExportSpec, size: tuple[int, int], dynamic: bool, opset: int, palette: list) -> dict[str, Any]:
    return {
        "format": SIDECAR_FORMAT, "kind": spec.kind, "opset": opset,
        "input": {"name": "image", "layout": "NCHW", "dtype": "float32", "batch": 1,
                  "size": None if dynamic else list(size), "dynamic": dynamic, "example_size": list(size)},
        "output": {"name": "logits", "layout": "NCHW", "dtype": "float32", "at": "input size"},
        "normalization": {"scale": "rgb / 255", "mean": list(spec.mean), "std": list(spec.std)},
        "resize": {"long_side": spec.long_side,
                   "reference_size": list(spec.reference_size) if spec.reference_size else None},
        "test_time": {"scales": list(spec.scales), "flip": spec.flip, "in_graph": True},
        "classes": list(spec.class_names), "has_background": spec.has_background, "palette": palette,
        "notes": list(spec.notes), "source": spec.source,
    }


#: a graph whose logits differ from torch's by more than this fraction of torch's largest |logit| is refused:
#: the float32 kernels of the two runtimes agree to ~1e-6 relative; a traced size frozen into a ``--dynamic``
#: graph (one network measured 4e-3 off at another size) or a mis-exported operator shows up far above it
MAX_RELATIVE_DIFF = 2e-3


def check_graph(spec: ExportSpec, out: Path, sizes: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Largest ``|onnxruntime - torch|`` logit difference at each ``(H, W)`` on a fixed pseudo-random input.

    Raises:
        ValueError: onnxruntime fails, gives another shape, or differs from torch by more than
            :data:`MAX_RELATIVE_DIFF` of torch's largest |logit| (e.g. a ``--dynamic`` graph whose network fixed
            a size while tracing); the message names the size.
    """
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing size is reported below, in one line
    try:
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # e.g. an operator without an onnxruntime kernel
        raise ValueError(f"onnxruntime cannot load the graph ({str(exc)[:200]})") from None
    diffs = {}
    for h, w in sizes:
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32))
        with torch.no_grad():
            ref = spec.module(x).numpy()
        try:
            got = session.run(["logits"], {"image": x.numpy()})[0]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"the exported graph fails at {h} x {w} in onnxruntime ({str(exc)[:200]})") from None
        if got.shape != ref.shape:
            raise ValueError(f"the exported graph gives {got.shape} at {h} x {w}, torch {ref.shape}")
        diff = float(np.abs(got - ref).max())
        scale = max(float(np.abs(ref).max()), 1e-6)
        if diff > MAX_RELATIVE_DIFF * scale:
            raise ValueError(f"the exported graph differs from torch at {h} x {w} by {diff:.3g} (relative "
                             f"{diff / scale:.3g} > {MAX_RELATIVE_DIFF:g}): it runs but computes something else")
        diffs[f"{h}x{w}"] = diff
    return diffs


@contextlib.contextmanager
def _export_contexts(module: nn.Module, dynamic: bool) -> Iterator[None]:
    """Enter each submodule's ``onnx_export_context(dynamic)`` while the exporter traces (Mask2Former's dtype fix).

    A network whose eager code traces into a graph that onnxruntime cannot run (or that is wrong at other sizes)
    provides such a context manager: it changes the module only inside it (the torch reference of
    :func:`check_graph` runs outside, unchanged), or raises ``ValueError`` for options it cannot honour.
    """
    with contextlib.ExitStack() as stack:
        for sub in module.modules():
            hook = getattr(sub, "onnx_export_context", None)
            if callable(hook):
                stack.enter_context(hook(dynamic))
        yield


def export_onnx(spec: ExportSpec, out: Path, size: Optional[tuple[int, int]] = None, dynamic: bool = False,
                opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write ``out`` (the ONNX graph) and ``out.json`` (the sidecar), both atomically; returns the sidecar.

    ``size``: the graph's ``(H, W)`` (default ``spec.size``); with ``dynamic`` H and W are symbolic and
    ``size`` is only the example the exporter traces. Before ``out`` is put in place, onnxruntime runs the
    graph against torch (at ``size``, and at ``size + (16, 32)`` with ``dynamic``); a graph that fails or
    gives another shape or other numbers (:data:`MAX_RELATIVE_DIFF`) is not written (``ValueError``), an existing ``out`` is left as it was. The
    differences go into the sidecar's ``check``. Same weights, same options -> the same bytes.
    """
    from tag2mask.io.atomic import atomic_path, atomic_write_text
    from tag2mask.io.palette import voc_palette

    require_onnx()
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    h, w = size or spec.size
    if h < 16 or w < 16:
        raise ValueError(f"--size must be at least 16 x 16, got {h} x {w}")
    example = torch.zeros(1, 3, h, w)  # constant input: the trace, hence the file, depends on nothing random
    axes = {"image": {2: "height", 3: "width"}, "logits": {2: "height", 3: "width"}} if dynamic else None
    module = spec.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation / tracer notes say nothing about this file
        with atomic_path(out) as tmp:  # an error below leaves an existing OUT (and its sidecar) as they were
            try:
                with _export_contexts(module, dynamic):
                    torch.onnx.export(module, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                                      opset_version=opset, dynamo=False, dynamic_axes=axes, do_constant_folding=True)
            except Exception as exc:  # the exporter's own error types; their messages dump the whole graph
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise ValueError(f"the {spec.kind} network {spec.source.get('network', '')} does not export to ONNX "
                                 f"at {h} x {w}{' (dynamic)' if dynamic else ''}: {first}") from None
            # the same check for every graph: onnxruntime must run what was written (some operators export
            # but have no onnxruntime kernel, e.g. Mask2Former's GridSample)
            sizes = [(h, w), (h + 16, w + 32)] if dynamic else [(h, w)]
            try:
                diffs = check_graph(spec, tmp, sizes)
            except ValueError as exc:
                hint = "; export at a fixed --size H W instead" if dynamic else ""
                raise ValueError(f"the {spec.kind} network {spec.source.get('network', '')} does not run in "
                                 f"onnxruntime as exported: {exc}{hint}") from None
    palette = voc_palette(len(spec.class_names))[: len(spec.class_names)].tolist()
    sidecar = _sidecar(spec, (h, w), dynamic, opset, palette)
    sidecar["check"] = {"max_abs_logit_diff_onnxruntime_vs_torch": diffs, "input": "standard normal, seed 0"}
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=1) + "\n")
    return sidecar
