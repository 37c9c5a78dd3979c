"""The export hook of CLIP-ZSS students (registry ``RUN_EXPORTERS["clip-zss"]``): the student network with its
text head fixed to one class list (``--classes``, default the classes of its training data), so the graph
needs no text encoder; another class list is another export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from tag2mask.export.onnx_graph import ExportSpec, TtaLogits

__all__ = ["export_spec"]


def export_spec(checkpoint: Union[str, Path], weights: Optional[str] = None,
                classes: Optional[str] = None) -> ExportSpec:
    """The graph and sidecar facts of a CLIP-ZSS run; ``weights`` names the CLIP whose text encoder embeds
    ``classes`` (plain names ``'a, b, c'``; default: the run's own CLIP and classes)."""
    from tag2mask.methods.clip_zss.inference import ZeroShotStudent

    student = ZeroShotStudent.from_run(checkpoint, device="cpu", weights=weights, classes=classes)
    config = student.seg_config
    if config.test_mode != "whole":
        note = [f"the run tests with a sliding window ({config.test_crop}/{config.test_stride}); the graph runs the "
                "whole image in one forward"]
    else:
        note = []
    norm = student.model.normalization
    return ExportSpec(
        module=TtaLogits(student.model, config.test_scales, config.test_flip), kind="clip-zss",
        class_names=tuple(student.class_names), has_background=bool(student.has_background),
        mean=tuple(float(v) for v in norm.mean), std=tuple(float(v) for v in norm.std),
        size=(int(config.crop_size), int(config.crop_size)), long_side=config.test_long_side,
        reference_size=tuple(config.test_reference_size) if config.test_reference_size else None,
        scales=tuple(config.test_scales), flip=bool(config.test_flip),
        notes=note + ["the text head holds the embeddings of these classes; export again for other classes"],
        source={"checkpoint": str(checkpoint), "network": type(student.model).__name__,
                "clip_fingerprint": student.clip_fingerprint})
