"""WeCLIP inference from a training checkpoint (official ``test_msc_flip_voc.py`` recipe).

Per image: normalise (ImageNet statistics under compat), bilinear resize (``align_corners=False``)
so that the long side is 512; run the model on ``[x, flip(x)]`` and average the logits with the
re-flipped ones; repeat at scale 0.75 of the resized image (``scale_factor`` interpolation) and
bring its logits to the scale-1 logit size; mean over scales; bilinear to the image size; argmax.
Optional dense CRF with WeCLIP's parameters (:data:`~tag2mask.refinement.crf.WECLIP_CRF`) on the
softmax probabilities and the raw RGB image (the released script has it commented out; the paper's
numbers use it). The decoder is in eval mode (Dropout2d off); no pseudo labels are computed, so no
image-level labels are needed at test time.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.inference import multiscale_flip_logits
from tag2mask.methods.weclip.model import WeCLIP, WeCLIPConfig, build_clip_for, normalize_rgb

__all__ = ["multiscale_logits", "load_checkpoint", "WeCLIPSegmenter", "segment_with_checkpoint"]


@torch.no_grad()
def multiscale_logits(
    model: WeCLIP, image: torch.Tensor, scales: Sequence[float] = (1.0, 0.75), flip: bool = True
) -> torch.Tensor:
    """Scale/flip-averaged stride-16 logits.

    Args:
        model: a WeCLIP model (put it in eval mode first).
        image: ``(1, 3, H, W)`` normalised image at the base size (long side 512 in the recipe).
        scales: factors applied with ``F.interpolate(scale_factor=s)``; 1.0 is the base.
        flip: also run the horizontally flipped copy and average.

    Returns:
        ``(1, C, H // 16, W // 16)`` float32 logits (the encoder floors sizes to the patch grid).
    """
    size = (image.shape[-2] // 16, image.shape[-1] // 16)
    return multiscale_flip_logits(lambda x: model(x).seg_logits, image, scales, flip, out_size=size)


def load_checkpoint(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], WeCLIPConfig, dict[str, Any]]:
    """Read a WeCLIP checkpoint (file, or run folder: its newest complete one) → ``(decoder state, config, CLIP ref)``.

    Read with ``weights_only=True`` (tensors and plain data only). The CLIP reference is
    ``{"weights": path, "fingerprint": ...}``: CLIP weights are never stored in the checkpoint
    (frozen, and usually far larger than the 6 M decoder parameters). A relative ``weights`` path
    (a converted official checkpoint keeps its CLIP next to it) is relative to the checkpoint's folder.
    """
    from tag2mask.io.paths import path_inside
    from tag2mask.runs.layout import read_run_checkpoint

    ckpt = read_run_checkpoint(path, task="weclip")
    ref = dict(ckpt["meta"].get("clip", {}))
    weights = ref.get("weights")
    if weights and not Path(weights).is_absolute():
        # relative: a converted run keeps its CLIP inside the run folder, and nowhere else
        folder = Path(ckpt["path"]).parent
        ref["weights"] = str(path_inside(folder, weights, ckpt["path"]))
    try:
        config = WeCLIPConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{ckpt['path']}: {exc}") from None
    return ckpt["modules"]["decoder"], config, ref


class WeCLIPSegmenter:
    """Trained WeCLIP ready for inference.

    Args:
        checkpoint: checkpoint file or run folder (its newest complete checkpoint).
        device: torch device or ``auto``/``cpu``/``cuda[:N]``.
        weights: CLIP weights; default: the path recorded at training time. Its fingerprint must
            match the recorded one (the decoder was trained on exactly those features).
        crf: dense CRF post-processing with WeCLIP's parameters.
        precision: ``fp32`` | ``bf16`` | ``fp16`` autocast.
        scales, flip, long_side: override the config's test-time settings.
    """

    takes_classes = False  # the run brings its own classes
    has_background = True

    @classmethod
    def from_run(cls, checkpoint: Union[str, Path], device: Union[str, torch.device] = "auto",
                 weights: Optional[str] = None, crf: bool = False, classes: Optional[str] = None) -> "WeCLIPSegmenter":
        """The predictor of ``segment --checkpoint`` (see :data:`tag2mask.methods.registry.RUN_PREDICTORS`)."""
        if classes is not None:
            raise ValueError("--classes with --checkpoint applies to CLIP-ZSS students (train clip-zss); this run "
                             "brings its own classes")
        return cls(checkpoint, device=device, weights=weights, crf=crf)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Label value -> name of :meth:`predict`'s output (0 = background)."""
        return ("background",) + tuple(self.config.classes)

    def __init__(
        self,
        checkpoint: Union[str, Path],
        device: Union[str, torch.device] = "auto",
        weights: Optional[str] = None,
        crf: bool = False,
        precision: str = "fp32",
        scales: Optional[Sequence[float]] = None,
        flip: Optional[bool] = None,
        long_side: Optional[int] = None,
    ) -> None:
        from tag2mask.runtime import resolve_device, resolve_dtype

        state, config, ref = load_checkpoint(checkpoint)
        self.device = resolve_device(device) if isinstance(device, str) else device
        clip = build_clip_for(config, weights or ref.get("weights"), self.device)
        want = ref.get("fingerprint")
        if want and getattr(clip, "fingerprint", want) != want:
            raise ValueError(
                f"CLIP weights {weights or ref.get('weights')} (fingerprint {clip.fingerprint}) are not the ones "
                f"the checkpoint was trained with ({want}); pass the right --weights"
            )
        self.model = WeCLIP(clip, config).to(self.device)
        self.model.decoder.load_state_dict(state)
        self.model.eval()
        self.config = config
        self.crf = crf
        self.autocast_dtype = resolve_dtype(precision)
        self.scales = tuple(scales) if scales is not None else config.test_scales
        self.flip = config.test_flip if flip is None else flip
        self.long_side = long_side or config.test_long_side

    @torch.no_grad()
    def predict(self, image: Union[Image.Image, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Segment one image.

        Returns:
            ``label (H, W)`` uint8 (0 = background, ``k + 1`` = class k) and ``probs (C, H, W)``
            float32 (softmax of the averaged logits, or the CRF marginals with ``crf=True``).
        """
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
        h, w = rgb.shape[:2]
        x = normalize_rgb(rgb, self.config.normalization)[None].to(self.device)
        r = self.long_side / max(h, w)
        x = F.interpolate(x, size=(int(h * r), int(w * r)), mode="bilinear", align_corners=False)
        ctx = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with ctx:
            logits = multiscale_logits(self.model, x, self.scales, self.flip)
        logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)[0].cpu().numpy()
        if self.crf:
            from tag2mask.refinement.crf import WECLIP_CRF, dense_crf

            probs = dense_crf(probs, rgb, WECLIP_CRF)
        return probs.argmax(axis=0).astype(np.uint8), probs.astype(np.float32)


def segment_with_checkpoint(
    images: Union[str, Path],
    checkpoint: Union[str, Path],
    out: Union[str, Path],
    device: str = "auto",
    crf: bool = False,
    weights: Optional[str] = None,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, Any]:
    """Segment an image file or folder with a trained WeCLIP; write ``OUT/masks/<stem>.png`` (VOC palette).

    Returns a summary (also written to ``OUT/run.json``): image count, seconds, settings.
    """
    from tag2mask.data.datasets import IMAGE_SUFFIXES
    from tag2mask.data.images import load_image
    from tag2mask.io.atomic import atomic_write_text
    from tag2mask.io.palette import save_label_png

    src = Path(images)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif src.is_file():
        files = [src]
    else:
        raise FileNotFoundError(f"{src}: no such image or folder")
    if not files:
        raise FileNotFoundError(f"{src}: no images")
    seg = WeCLIPSegmenter(checkpoint, device=device, weights=weights, crf=crf, precision=precision)
    out = Path(out)
    tic = time.perf_counter()
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="segment")
    for f in it:
        label, _ = seg.predict(load_image(f))
        save_label_png(out / "masks" / f"{f.stem}.png", label)
    summary = {
        "method": "weclip", "checkpoint": str(checkpoint), "images": len(files), "crf": crf,
        "scales": list(seg.scales), "flip": seg.flip, "long_side": seg.long_side,
        "classes": ["background", *seg.config.classes], "seconds": round(time.perf_counter() - tic, 3),
        "masks": str(out / "masks"),
    }
    atomic_write_text(out / "run.json", json.dumps(summary, indent=2))
    return summary
