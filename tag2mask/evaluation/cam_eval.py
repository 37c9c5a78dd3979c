"""CAM / seed evaluation as in CLIP-ES (``eval_cam``), with its exact float16 semantics.

For every image the foreground CAMs of the image's labels are stacked with a background
score and the argmax is taken:

* power mode (CLIP-ES): ``bg = (1 - max_k cam_k) ** p`` computed **in float16** (the
  CAMs are stored as float16 and numpy keeps that dtype; computing bg in float32 flips
  tens of pixels at p = 2 on the reference fixtures);
* threshold mode (IRN / ReCAM style): ``bg = t`` constant, cast to the CAM dtype.

Ties in the argmax go to the first index: background first, then the label order of
``keys``. One confusion matrix is accumulated per setting, streaming over images; the best
setting is the one with strictly larger mIoU, so the first setting wins ties (the official
script keeps p = 1 when p = 2 is only equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tag2mask.evaluation.miou import DEFAULT_MIOU_RULE, ConfusionMatrix, check_miou_rule
from tag2mask.localization.labels import cams_to_labels

__all__ = ["cam_to_label", "evaluate_cams", "load_cam_npz"]


def _check_cams(cams: np.ndarray, keys: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    cams = np.asarray(cams)
    keys = np.asarray(keys).reshape(-1)
    if cams.ndim != 3:
        raise ValueError(f"{name}: cams must be (K, H, W), got shape {cams.shape}")
    if cams.shape[0] != keys.shape[0]:
        raise ValueError(f"{name}: {cams.shape[0]} CAMs but {keys.shape[0]} keys")
    if not np.issubdtype(cams.dtype, np.floating):
        raise ValueError(f"{name}: cams must be floating point, got {cams.dtype}")
    if keys.size and not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"{name}: keys must be integer class ids, got {keys.dtype}")
    if keys.size and keys.min() < 0:
        raise ValueError(f"{name}: negative class id {int(keys.min())} in keys")
    bad = int(cams.size - np.count_nonzero(np.isfinite(cams)))
    if bad:
        # NaN never wins an argmax comparison: it would silently turn pixels into background
        raise ValueError(f"{name}: {bad:,} of {cams.size:,} CAM values are NaN or infinite; "
                         "re-create this file (e.g. tag2mask label ... --resume after deleting it)")
    return cams, keys.astype(np.int64)


def cam_to_label(
    cams: np.ndarray,
    keys: np.ndarray,
    bg_power: float | None = 1,
    threshold: float | None = None,
    name: str = "<item>",
) -> np.ndarray:
    """Turn per-label CAMs into a label map the CLIP-ES way.

    Args:
        cams: ``(K, H, W)`` float CAMs in [0, 1] (float16 as written by ``tag2mask label``;
            the arithmetic is done in this dtype, so pass float16 for official numbers).
        keys: ``(K,)`` int 0-based foreground class ids (class ``k`` -> label ``k + 1``).
        bg_power: ``p`` in ``bg = (1 - max) ** p``; ignored when ``threshold`` is given.
        threshold: constant background score instead of the power rule.
        name: item name for error messages.

    Returns:
        ``(H, W)`` uint8 label map (0 = background, ``keys + 1`` otherwise).
    """
    cams, keys = _check_cams(cams, keys, name)
    if threshold is None and bg_power is None:
        raise ValueError("give bg_power or threshold")
    try:
        # every op stays in the CAM dtype (numpy rounds each float16 op), ties go to background
        return cams_to_labels(cams, keys, bg_power=bg_power if bg_power is not None else 1.0, threshold=threshold)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def load_cam_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``cams/<stem>.npz`` file: returns ``(cams (K,H,W) float as stored (float16), keys (K,) int64)``.

    Accepts the ``cams`` key written by ``tag2mask label`` and ``attn_highres`` (the CLIP-ES
    name used by the reference fixtures).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CAM file not found: {path}")
    from tag2mask.io.budget import npz_headers

    try:
        npz_headers(path)  # sizes and ratios from the headers, before any array is inflated
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            cam_key = "cams" if "cams" in files else "attn_highres" if "attn_highres" in files else None
            if cam_key is not None and "keys" in files:
                cams, keys = z[cam_key], z["keys"]
    except Exception as exc:  # not a zip / pickled / corrupt member: name the file
        raise ValueError(f"{path}: cannot read CAM npz ({exc})") from exc
    if cam_key is None or "keys" not in files:
        raise ValueError(f"{path}: CAM file needs arrays 'keys' and 'cams', found {sorted(files)}")
    cams, keys = _check_cams(cams, keys, str(path))
    return cams, keys


def _settings(powers: Sequence[float] | None, thresholds: Sequence[float] | None) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    for t in thresholds or ():
        out.append((f"t={t:g}", {"threshold": float(t)}))
    if not thresholds:
        for p in powers if powers is not None else (1, 2):
            out.append((f"p={p:g}", {"bg_power": p}))
    if not out:
        raise ValueError("need at least one bg power or threshold")
    return out


def evaluate_cams(
    items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    powers: Sequence[float] | None = (1, 2),
    thresholds: Sequence[float] | None = None,
    ignore_index: int = 255,
    names: Iterable[str] | None = None,
    miou_rule: str = DEFAULT_MIOU_RULE,
) -> dict:
    """Score CAMs for several background settings in one streaming pass.

    Args:
        items: iterable of ``(cams (K,H,W) float16, keys (K,) int, gt (H,W) int)``; consumed once.
        num_classes: C including background (21 for VOC).
        powers: background powers ``p`` (used when ``thresholds`` is empty/None).
        thresholds: constant background thresholds; if given, they replace ``powers``.
        ignore_index: ground-truth value to skip.
        names: optional item names, parallel to ``items``, for error messages.
        miou_rule: which classes the mean IoU averages (:data:`~tag2mask.evaluation.miou.MIOU_RULES`).

    Returns:
        ``{"p=1": scores, "p=2": scores, ..., "best": "p=1", "best_miou": float,
        "num_images": n, "miou_rule": rule}`` plus ``best_p`` / ``best_threshold``; each ``scores`` is
        :meth:`ConfusionMatrix.scores`.
    """
    check_miou_rule(miou_rule)
    settings = _settings(powers, thresholds)
    mats = [ConfusionMatrix(num_classes, ignore_index) for _ in settings]
    name_iter = iter(names) if names is not None else None
    n = 0
    for cams, keys, gt in items:
        name = next(name_iter, f"item {n}") if name_iter is not None else f"item {n}"
        for (_, kw), mat in zip(settings, mats):
            mat.update(cam_to_label(cams, keys, name=name, **kw), gt, name=name)
        n += 1
    result: dict = {}
    best_key, best_miou = None, None
    for (key, _), mat in zip(settings, mats):
        s = mat.scores(miou_rule)
        result[key] = s
        m = s["Mean IoU"]
        # strictly larger wins, so the first setting keeps ties (official behaviour)
        if m is not None and (best_miou is None or m > best_miou):
            best_key, best_miou = key, m
    result["best"] = best_key
    result["best_miou"] = best_miou
    if best_key is not None:
        kw = dict(settings)[best_key]
        if "bg_power" in kw:
            result["best_p"] = kw["bg_power"]
        else:
            result["best_threshold"] = kw["threshold"]
    result["num_images"] = n
    result["miou_rule"] = miou_rule
    return result
