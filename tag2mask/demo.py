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
OVSS_METHODS = ("maskclip", "sclip", "clearclip", "naclip")
# tag2mask.methods.ovss2; SC-CLIP's fixed block indices need 11+ blocks (the shipped tiny CLIP has 6)
# and CorrCLIP needs a DINO, so neither is in the demo
NEWER_OVSS_METHODS = ("pearl",)

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
    "pearl": ("PEARL (CVPR'26): Procrustes-aligned last-block attention, then text-aware Laplacian "
              "propagation of the logits", TOLD_NAMES),
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
) -> dict[str, Callable[[Image.Image, list[int]], np.ndarray]]:
    """name -> predict(image, label_ids) giving a (H, W) uint8 label map (0 bg, class id + 1).

    ``weclip`` needs ``weclip_checkpoint`` (a run trained with ``tag2mask train weclip --data synth``
    on the same CLIP weights); it predicts from the image alone.
    """
    from tag2mask.methods.clip_es import ClipES, preset_for
    from tag2mask.methods.pseudo_labels import LabelRefiner

    device = next(model.parameters()).device
    preds: dict[str, Callable] = {}
    needs_es = any(m.startswith("clip-es") or m == "gradcam" for m in methods)
    if needs_es:
        maker = ClipES(model, vocab, preset_for("synth"))  # photo template, float32: what the tiny CLIP knows
        plain = LabelRefiner("none", device=device)
        pamr = LabelRefiner("pamr", device=device)
        # scored without the 0.95 ignore region, as the official --eval_only does
        crf = LabelRefiner("crf", compat=False, confidence=None, device=device) if with_crf else None

        def gradcam_only(image: Image.Image, ids: list[int]) -> np.ndarray:
            # raw softmax-GradCAM (no attention affinity), upsampled like the refined maps
            _, cams, _ = maker.lowres(image, ids)
            high = maker._upsample(cams, (image.size[1], image.size[0])).astype(np.float16)
            return plain(high, np.asarray(ids), np.asarray(image))[0]

        def es_with(refiner):
            return lambda image, ids: refiner(maker(image, ids).cams, np.asarray(ids), np.asarray(image))[0]

        table = {"gradcam": gradcam_only, "clip-es": es_with(plain), "clip-es+pamr": es_with(pamr)}
        if crf is not None:
            table["clip-es+crf"] = es_with(crf)
        preds.update({k: v for k, v in table.items() if k in methods})
    if "weclip" in methods:
        if not weclip_checkpoint:
            raise ValueError("method 'weclip' needs a trained checkpoint (tag2mask train weclip --data synth)")
        from tag2mask.methods.weclip.inference import WeCLIPSegmenter

        weclip = WeCLIPSegmenter(weclip_checkpoint, device=device, weights=getattr(model, "source_path", None))
        preds["weclip"] = lambda image, ids: weclip.predict(image)[0]
    for m in methods:
        if m in OVSS_METHODS:
            from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter

            seg = OpenVocabSegmenter(model, vocab, m, templates=SYNTH_TEMPLATES, short_side=None, mode="whole")
            preds[m] = lambda image, ids, seg=seg: seg.predict(image).label
        elif m in NEWER_OVSS_METHODS:
            from tag2mask.methods.ovss2 import NewerOvssSegmenter

            seg = NewerOvssSegmenter(model, vocab, m, templates=SYNTH_TEMPLATES, short_side=None, mode="whole")
            preds[m] = lambda image, ids, seg=seg: seg.predict(image).label
    return preds


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
) -> dict[str, MethodScore]:
    """Score ``methods`` on ``n_images`` synthetic scenes of ``split``; labels come from the scenes.

    ``on_image(i, image, gt, outputs, tags)`` sees each scene: its (H, W) uint8 ground truth, the
    (H, W) uint8 label map of every method and the scene's tag names.
    """
    vocab = get_vocabulary("synth")
    num_classes = len(OBJECT_NAMES) + 1
    predictors = build_predictors(model, vocab, methods, with_crf, weclip_checkpoint)
    scores = {m: MethodScore(m, ConfusionMatrix(num_classes)) for m in predictors}
    data = SyntheticDataset(split, n_images, size)
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
