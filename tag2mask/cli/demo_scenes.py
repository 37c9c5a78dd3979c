"""Run every training-free method on synthetic scenes and score it: the demo and the quality benchmark.

Everything here is offline: scenes come from :mod:`tag2mask.synth`, the model is the tiny CLIP
shipped with the package (or any weights given), ground truth is exact.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from tag2mask.clip.model import CLIP
from tag2mask.evaluation.miou import ConfusionMatrix
from tag2mask.synth.splits import SyntheticDataset
from tag2mask.synth.world import OBJECT_NAMES
from tag2mask.vocab.vocabulary import Vocabulary, get_vocabulary

# prompts the shipped tiny CLIP was trained with
SYNTH_TEMPLATES = ("a photo of a {}.",)

TOLD_TAGS = "the scene's tags"
TOLD_NAMES = "all class names"
#: method -> (what it is, in one line; what it is told about each image)
METHOD_INFO: dict[str, tuple[str, str]] = {
    "gradcam": ("CLIP-ES without its attention affinity: raw softmax-GradCAM of each tag, argmax against "
                "a (1 - max) background", TOLD_TAGS),
    "clip-es": ("CLIP-ES (CVPR'23): softmax-GradCAM refined by class-aware attention affinity inside the "
                "CAM boxes; no post-processing", TOLD_TAGS),
    "clip-es+pamr": ("CLIP-ES followed by PAMR, pixel-adaptive refinement along colour edges", TOLD_TAGS),
    "clip-es+crf": ("CLIP-ES followed by its dense CRF (stage 2; scored without the 0.95 ignore region)",
                    TOLD_TAGS),
    "maskclip": ("MaskCLIP (ECCV'22): the last block's value embeddings as dense features, matched to the "
                 "class prompts", TOLD_NAMES),
    "sclip": ("SCLIP: last-block attention replaced by query-query + key-key correlative attention",
              TOLD_NAMES),
    "clearclip": ("ClearCLIP: last block with query-query attention, without residual and feed-forward",
                  TOLD_NAMES),
    "naclip": ("NACLIP: last block with key-key attention plus a Gaussian neighbourhood prior, without "
               "residual and feed-forward", TOLD_NAMES),
    "scclip": ("SC-CLIP (TIP'25): anomaly tokens smoothed, features re-aggregated by mid-block similarity, "
               "multi-level fusion through the last block", TOLD_NAMES),
    "pearl": ("PEARL (CVPR'26): Procrustes-aligned last-block attention, then text-aware Laplacian "
              "propagation of the logits", TOLD_NAMES),
    "corrclip": ("CorrCLIP (ICCV'25): last-block attention scoped to class-agnostic regions and guided by DINO "
                 "features, then map correction per region", TOLD_NAMES),
    "weclip": ("WeCLIP (CVPR'24): a decoder trained on frozen-CLIP pseudo-labels; predicts from the image "
               "alone", "nothing (trained on tags)"),
}


@dataclass
class MethodScore:
    name: str
    confusion: ConfusionMatrix
    seconds: float = 0.0
    per_image: list[float] = field(default_factory=list)

    @property
    def miou(self) -> float:
        return float(self.confusion.scores()["Mean IoU"] or 0.0)


def _image_iou(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, gt)
    return float(cm.scores()["Mean IoU"] or 0.0)


def build_predictors(
    model: CLIP,
    vocab: Vocabulary,
    methods: Sequence[str],
    with_crf: bool,
    weclip_checkpoint: Optional[str] = None,
    inputs: Optional[dict[str, dict]] = None,
) -> dict[str, Callable[[Image.Image, list[int]], np.ndarray]]:
    """name -> predict(image, label_ids) giving a (H, W) uint8 label map (0 bg, class id + 1).

    Each name is dispatched to its method's demo factory in :mod:`tag2mask.methods.registry`.
    ``weclip`` needs ``weclip_checkpoint`` (a run trained with ``tag2mask train weclip --data synth``
    on the same CLIP weights); it predicts from the image alone. ``inputs``: the methods' extra inputs
    (:func:`tag2mask.methods.registry.method_inputs`, e.g. CorrCLIP's DINO and regions).
    """
    from tag2mask.methods import registry

    options = {"with_crf": with_crf, "weclip_checkpoint": weclip_checkpoint, "templates": SYNTH_TEMPLATES,
               "inputs": dict(inputs or {})}
    groups: dict[str, list[str]] = {}
    for name in methods:
        groups.setdefault(registry.get(name).name, []).append(name)
    found: dict[str, Callable] = {}
    for method, wanted in groups.items():
        found.update(registry.load(registry.get(method).demo)(model, vocab, wanted, options))
    # the caller's order (each method's group is built at once: CLIP-ES's variants share one CAM maker)
    return {name: found[name] for name in methods if name in found}


def evaluate_methods(
    model: CLIP,
    n_images: int,
    methods: Sequence[str],
    size: int = 224,
    split: str = "test",
    with_crf: bool = False,
    on_image: Optional[Callable[[int, Image.Image, np.ndarray, dict[str, np.ndarray], list[str]], None]] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    weclip_checkpoint: Optional[str] = None,
    inputs: Optional[dict[str, dict]] = None,
) -> dict[str, MethodScore]:
    """Score ``methods`` on ``n_images`` synthetic scenes of ``split``; labels come from the scenes.

    ``on_image(i, image, gt, outputs, tags)`` sees each scene: its (H, W) uint8 ground truth, the
    (H, W) uint8 label map of every method and the scene's tag names. Each method runs once on the
    first scene before the timed loop (warm-up), so ``seconds`` holds no one-time costs. ``inputs``: as
    :func:`build_predictors`.
    """
    vocab = get_vocabulary("synth")
    num_classes = len(OBJECT_NAMES) + 1
    predictors = build_predictors(model, vocab, methods, with_crf, weclip_checkpoint, inputs=inputs)
    scores = {m: MethodScore(m, ConfusionMatrix(num_classes)) for m in predictors}
    data = SyntheticDataset(split, n_images, size)
    if n_images:
        # why: the first call of a method pays one-time costs (text embeddings, lazy imports, allocator
        # growth); one untimed, unscored pass on the first scene keeps them out of every ms/image
        first = data[0]
        for fn in predictors.values():
            fn(Image.fromarray(first.image), [c - 1 for c in first.labels])
    indices = range(n_images)
    for i in progress(indices) if progress else indices:
        scene = data[i]
        image = Image.fromarray(scene.image)
        ids = [c - 1 for c in scene.labels]
        outputs = {}
        for name, fn in predictors.items():
            t0 = time.perf_counter()
            pred = fn(image, ids)
            scores[name].seconds += time.perf_counter() - t0
            scores[name].confusion.update(pred, scene.mask)
            scores[name].per_image.append(_image_iou(pred, scene.mask, num_classes))
            outputs[name] = pred
        if on_image is not None:
            on_image(i, image, scene.mask, outputs, [vocab.names[k] for k in ids])
    return scores


def results_table(scores: dict[str, MethodScore], n_images: int) -> str:
    lines = ["| method | mIoU (%) | ms / image |", "|---|---|---|"]
    for s in scores.values():
        lines.append(f"| {s.name} | {100 * s.miou:.1f} | {1000 * s.seconds / max(1, n_images):.0f} |")
    return "\n".join(lines)


def write_results_json(path: Path, scores: dict[str, MethodScore]) -> None:
    from tag2mask.io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps({k: round(v.miou, 6) for k, v in scores.items()}, indent=2))
