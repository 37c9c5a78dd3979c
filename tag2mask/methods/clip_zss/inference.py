"""Test time of CLIP-ZSS: the student alone, classifying against the text embeddings of any class names.

No CLIP image tower is built: class names are embedded with CLIP's text encoder only
(:func:`tag2mask.clip.text_tower.load_clip_text`, the weights the run was trained with, checked by
fingerprint), and the student's text head gets those embeddings. Sliding-window, multi-scale and
flip settings come from the run (``test_mode`` / ``test_crop`` / ``test_stride`` ...; ZegCLIP's
protocol is a 512 window every 426 pixels).

Zero-shot scoring (:func:`evaluate_zero_shot`) predicts every class of the data set (seen and
unseen), maps outputs to label values and reports mIoU, mIoU(S), mIoU(U) and their harmonic mean.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from tag2mask.methods.clip_zss.config import ClipZssConfig
from tag2mask.methods.clip_zss.method import ClassLayout, embed_class_names

__all__ = ["text_vocabulary", "evaluate_zero_shot", "ZeroShotStudent", "read_zss_checkpoint", "plain_class_names"]


@contextlib.contextmanager
def text_vocabulary(model: nn.Module, embeddings: Tensor) -> Iterator[None]:
    """Give the student's text head ``embeddings`` ``(K, D)`` for the duration (the previous ones come back)."""
    head = model.text_classifier
    saved = head.text.clone()
    try:
        model.set_text_embeddings(embeddings)
        yield
    finally:
        model.set_text_embeddings(saved)


def evaluate_zero_shot(model: nn.Module, source: Any, seg_config: Any, layout: ClassLayout, ctx: Any = None,
                       limit: Optional[int] = None, write_dir: Optional[Path] = None) -> dict[str, Any]:
    """Score a student whose text head holds *all* foreground classes of ``layout`` on ``source``.

    Predictions are label values (output ``i`` -> ``i + layout.label_offset``); with an ignored
    background the ground truth's 0 is not scored. Returns ``tag2mask eval``'s report layout plus
    ``seen_unseen`` = ``{"mIoU_seen", "mIoU_unseen", "hIoU"}`` and ``unseen_ids``.
    """
    from tag2mask.data.segmentation import IGNORE
    from tag2mask.evaluation.miou import seen_unseen_scores
    from tag2mask.segmenter.evaluation import score_predictions

    names = layout.class_names
    rank = ctx.rank if ctx is not None else 0

    def ignore_background(gt: np.ndarray) -> np.ndarray:
        return np.where(gt == 0, IGNORE, gt).astype(np.uint8)

    total, per_image, n = score_predictions(
        model, source, seg_config, len(names), ctx=ctx, limit=limit, write_dir=write_dir,
        label_offset=layout.label_offset, transform_gt=ignore_background if layout.background == "ignore" else None)
    scores = total.scores()
    seen, unseen, hiou = seen_unseen_scores(scores["Class IoU"], layout.unseen_ids,
                                            include_background=layout.background == "class")
    report = {"mode": "labels", "num_images": n, "class_names": list(names), "scores": scores,
              "per_image_miou": dict(sorted(per_image.items())), "data": getattr(source, "description", ""),
              "unseen_ids": list(layout.unseen_ids), "unseen": list(layout.unseen),
              "background": layout.background,
              "seen_unseen": {"mIoU_seen": seen, "mIoU_unseen": unseen, "hIoU": hiou}}
    if write_dir is not None and rank == 0:
        from tag2mask.io.atomic import atomic_write_text

        atomic_write_text(write_dir / "eval.json", json.dumps(report, indent=1, allow_nan=False))
    return report


def read_zss_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """The newest complete checkpoint of a ``train clip-zss`` run (``weights_only`` loading)."""
    from tag2mask.runs.layout import read_run_checkpoint

    return read_run_checkpoint(path, task="clip-zss")


class ZeroShotStudent:
    """A trained CLIP-ZSS student behind ``predict(image) -> (label (H, W) uint8, probs (C, H, W))``.

    Args:
        checkpoint: a ``train clip-zss`` run folder or checkpoint file.
        device: ``cpu|cuda|auto``.
        weights: CLIP weights whose *text* encoder embeds new class names (default: the weights the
            run was trained with, as recorded); other weights than the run's are refused.
        classes: class names to segment (default: every class of the training data set, seen and unseen).
        prompts: optional ``{name: prompt words}``.
    """

    takes_classes = True  # any class names: the student classifies against their text embeddings

    @classmethod
    def from_run(cls, checkpoint: Union[str, Path], device: Union[str, torch.device] = "auto",
                 weights: Optional[str] = None, crf: bool = False, classes: Optional[str] = None) -> "ZeroShotStudent":
        """The predictor of ``segment --checkpoint`` (see :data:`tag2mask.methods.registry.RUN_PREDICTORS`);
        ``classes``: the ``--classes`` text (plain names ``a, b, c``)."""
        if crf:
            raise ValueError("--crf applies to WeCLIP checkpoints, not to a CLIP-ZSS student")
        return cls(checkpoint, device=device, weights=weights,
                   classes=plain_class_names(classes) if classes is not None else None)

    def __init__(self, checkpoint: Union[str, Path], device: Union[str, torch.device] = "auto",
                 weights: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                 prompts: Optional[dict[str, str]] = None) -> None:
        from tag2mask.models import build_segmenter
        from tag2mask.runtime import resolve_device
        from tag2mask.segmenter.task import SegmenterConfig

        ckpt = read_zss_checkpoint(checkpoint)
        self.checkpoint = ckpt["path"]
        self.seg_config = SegmenterConfig.from_dict(ckpt["config"]["segmenter"])
        self.zss_config = ClipZssConfig.from_dict(ckpt["config"]["zss"])
        meta = ckpt["meta"]
        self.layout = ClassLayout(tuple(self.seg_config.class_names), tuple(self.zss_config.unseen),
                                  self.zss_config.background)
        self.clip_weights, self.clip_fingerprint = meta["clip"]["weights"], meta["clip"]["fingerprint"]
        network = meta.get("network") or {}
        model = build_segmenter(self.seg_config.model, self.layout.num_train_outputs,
                                **(network.get("config") or self.seg_config.model_options))
        frozen = tuple(model.frozen_prefixes())
        result = model.load_state_dict(ckpt["modules"]["model"], strict=not frozen)
        missing = [k for k in result.missing_keys if not k.startswith(frozen)]
        if missing or result.unexpected_keys:
            raise ValueError(f"{self.checkpoint}: the weights do not fit the recorded student ({missing[:3]})")
        dev = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(dev).eval()
        self.device = dev
        self.weights = weights
        self._text_model: Any = None
        self.long_side = self.seg_config.test_long_side
        self.scales, self.flip = tuple(self.seg_config.test_scales), bool(self.seg_config.test_flip)
        if classes is None:
            prompts = {**dict(meta.get("prompts") or {}), **(prompts or {})}
            classes = self.layout.foreground
        self.set_classes(classes, prompts)

    # -- vocabulary ---------------------------------------------------------------------------
    def text_model(self) -> Any:
        """CLIP's text encoder (loaded once, on first use)."""
        if self._text_model is None:
            from tag2mask.clip.text_tower import load_clip_text

            source = self.weights or self.clip_weights
            if not source:
                raise ValueError(f"{self.checkpoint}: the run records no CLIP weights; pass the CLIP it was trained with")
            tower = load_clip_text(source)
            if self.clip_fingerprint and tower.fingerprint != self.clip_fingerprint:
                raise ValueError(f"CLIP weights {source} (fingerprint {tower.fingerprint}) are not the ones the student "
                                 f"was trained with ({self.clip_fingerprint}); their text space does not fit it")
            self._text_model = tower
        return self._text_model

    def set_classes(self, names: Sequence[str], prompts: Optional[dict[str, str]] = None) -> None:
        """Segment into ``names`` from now on (label 0 = background when the student learned one)."""
        names = [str(n).strip() for n in names]
        if not names or any(not n for n in names):
            raise ValueError("class names must be non-empty")
        text = embed_class_names(self.text_model(), names, self.zss_config.templates, prompts)
        self.model.set_text_embeddings(text.to(self.device))
        self.names = tuple(names)

    @property
    def has_background(self) -> bool:
        return self.layout.learned_background

    @property
    def class_names(self) -> tuple[str, ...]:
        """Label value -> name of :meth:`predict`'s output."""
        return (("background",) if self.has_background else ()) + self.names

    # -- prediction ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: Any) -> tuple[np.ndarray, np.ndarray]:
        from tag2mask.segmenter.evaluation import predict_logits

        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        probs = predict_logits(self.model, rgb, self.seg_config).softmax(dim=0).cpu().numpy()
        return probs.argmax(axis=0).astype(np.uint8), probs.astype(np.float32)


def plain_class_names(spec: str) -> list[str]:
    """``--classes`` for a CLIP-ZSS student: class names only (one name per class, no background words)."""
    from tag2mask.vocab.vocabulary import load_vocabulary

    vocab = load_vocabulary(spec)
    if vocab.background or any(len(p) > 1 for p in vocab.prompt_names()):
        raise ValueError("--classes for a CLIP-ZSS student: plain class names 'a, b, c' (no synonyms, no background "
                         "words: the student has its own background)")
    return list(vocab.names)
