"""The export hook of ``train segmenter`` runs (registry ``RUN_EXPORTERS["segmenter"]``).

Every :mod:`tag2mask.models` network built from convolutions, attention and bilinear resizes traces to ONNX.
The run's whole-image test settings (scales, flip) go into the graph; a run that tests with a sliding
window (``test_mode="slide"``) is exported as one whole-image forward, and the sidecar says so.
Networks of the ``hf`` extra (SegFormer, Mask2Former through ``transformers``) export as their modules allow;
an exporter error names the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from tag2mask.export.onnx_graph import ExportSpec, TtaLogits

__all__ = ["export_spec"]


def export_spec(checkpoint: Union[str, Path], weights: Optional[str] = None,
                classes: Optional[str] = None) -> ExportSpec:
    """The graph and sidecar facts of a ``train segmenter`` run (file or run folder)."""
    from tag2mask.segmenter.predictor import load_trained_segmenter

    if weights is not None or classes is not None:
        raise ValueError("--weights and --classes do not apply to a `train segmenter` run (it brings its own network "
                         "and classes)")
    model, config = load_trained_segmenter(checkpoint, "cpu")
    notes = []
    if config.test_mode != "whole":
        notes.append(f"the run tests with a sliding window ({config.test_crop}/{config.test_stride}); the graph runs "
                     "the whole image in one forward")
    crop = config.crop_size if isinstance(config.crop_size, int) else max(config.crop_size)
    norm = model.normalization
    return ExportSpec(
        module=TtaLogits(model, config.test_scales, config.test_flip), kind="segmenter",
        class_names=tuple(config.class_names), has_background=bool(config.background),
        mean=tuple(float(v) for v in norm.mean), std=tuple(float(v) for v in norm.std),
        size=(int(crop), int(crop)), long_side=config.test_long_side,
        reference_size=tuple(config.test_reference_size) if config.test_reference_size else None,
        scales=tuple(config.test_scales), flip=bool(config.test_flip), notes=notes,
        source={"checkpoint": str(checkpoint), "network": type(model).__name__, "model": config.model})
