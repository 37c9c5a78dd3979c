"""The three stages of ``tag2mask label`` for the batch runner (:class:`tag2mask.jobs.overlap.Stages`).

* :class:`PrepareImage` (CPU, a worker): check the labels, decode the image, apply ``--max-pixels``;
* :class:`ComputeCAMs` (this process, the device): CLIP-ES on a batch of images; PAMR too when the
  model is on a GPU (as the serial job does, so the masks are the same);
* :class:`FinishMask` (CPU, a worker): CRF / PAMR / background argmax and confidence masking,
  the mask back at the original size, and the atomic writes of mask, CAMs and arrays.

With ``--workers 0`` the runner calls them one after the other in this process: the serial job.
The CPU stages are picklable (only settings; the refiner is built in the worker on first use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["LabelSettings", "PreparedImage", "ComputedCAMs", "PrepareImage", "ComputeCAMs", "FinishMask"]


@dataclass(frozen=True)
class LabelSettings:
    """What the CPU stages need from the command line (plain data: it is sent to every worker)."""

    class_names: tuple[str, ...]
    image_root: str
    out: str
    max_decode_pixels: int
    max_pixels: int
    max_pixels_policy: str
    save_arrays: bool
    refine: str
    bg_power: float
    confidence: Optional[float]
    compat: bool


@dataclass
class PreparedImage:
    """A decoded image ready for CLIP-ES. ``size`` is the original ``(width, height)``."""

    name: str
    image: Any  # PIL RGB image at the processed size
    label_ids: list[int]
    info: dict[str, Any]
    size: tuple[int, int]


@dataclass
class ComputedCAMs:
    """CLIP-ES output of one image, with what the finish stage needs.

    ``label`` / ``extra`` are set when the refinement already ran on the device.
    """

    name: str
    keys: Any  # (K,) int64
    cams: Any  # (K, h, w) float16 at the processed size
    arrays: dict[str, Any]
    rgb: Any  # (h, w, 3) uint8
    info: dict[str, Any]
    size: tuple[int, int]
    label: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class PrepareImage:
    """Stage 1: labels checked, image decoded (``--max-decode-pixels``) and fitted to ``--max-pixels``."""

    def __init__(self, settings: LabelSettings) -> None:
        self.settings = settings

    def __call__(self, sample, data: Optional[bytes] = None) -> PreparedImage:
        """``data``: the image file's bytes when already read (the Ray engine); decoded by the same rules."""
        from PIL import Image

        from tag2mask.data.images import fit_max_pixels, load_image
        from tag2mask.io.uri_inputs import relative_input
        from tag2mask.jobs.items import ItemError

        s = self.settings
        if not sample.label_ids:
            raise ItemError("labels", f"{sample.image_path}: empty label list; every image needs at least one class name")
        image = load_image(sample.image_path, max_pixels=s.max_decode_pixels, data=data)
        width, height = image.size
        info: dict[str, Any] = {"labels": [s.class_names[k] for k in sample.label_ids], "size": [height, width]}
        info["image"] = relative_input(sample.image_path, s.image_root)  # a URI prefix's key, too
        w, h = fit_max_pixels(width, height, s.max_pixels)
        if (w, h) != (width, height):
            if s.max_pixels_policy == "refuse":
                raise ItemError("too_large", f"{sample.image_path}: image is {width}x{height} = {width * height:,} pixels, "
                                f"more than --max-pixels {s.max_pixels:,}; raise --max-pixels or use "
                                "--max-pixels-policy downscale")
            # reducing_gap: a fast box pre-reduction then bicubic, antialiased like a plain bicubic
            image = image.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
            info["processed_size"] = [h, w]
        return PreparedImage(sample.name, image, list(sample.label_ids), info, (width, height))


class ComputeCAMs:
    """Stage 2 (this process): CLIP-ES CAMs for a batch of prepared images.

    ``device_refiner``: a :class:`~tag2mask.methods.clip_es.label_maps.LabelRefiner` to run here (PAMR on
    a GPU), or ``None`` to leave the refinement to the finish stage.
    """

    def __init__(self, cam_maker, save_arrays: bool, device_refiner=None) -> None:
        self.cam_maker, self.save_arrays, self.device_refiner = cam_maker, save_arrays, device_refiner

    def __call__(self, batch: Sequence[PreparedImage]) -> list[ComputedCAMs]:
        import numpy as np

        results = self.cam_maker.batch([p.image for p in batch], [p.label_ids for p in batch], keep_arrays=self.save_arrays)
        out = []
        for prepared, result in zip(batch, results):
            rgb = np.array(prepared.image, dtype=np.uint8)  # a writable copy: the refiners hand it to torch
            done = ComputedCAMs(prepared.name, result.keys, result.cams, result.arrays, rgb, prepared.info, prepared.size)
            if self.device_refiner is not None:
                done.label, done.extra = self.device_refiner(result.cams, result.keys, rgb)
            out.append(done)
        return out


class FinishMask:
    """Stage 3: refinement (unless done on the device), mask at the original size, atomic writes."""

    def __init__(self, settings: LabelSettings) -> None:
        self.settings = settings
        self._refiner = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "_refiner": None}  # the refiner is rebuilt where it runs

    @property
    def refiner(self):
        if self._refiner is None:
            from tag2mask.methods.clip_es.label_maps import LabelRefiner

            s = self.settings
            self._refiner = LabelRefiner(s.refine, bg_power=s.bg_power, confidence=s.confidence, compat=s.compat,
                                         device="cpu")
        return self._refiner

    def __call__(self, item: ComputedCAMs):
        import numpy as np
        from PIL import Image

        from tag2mask.jobs.items import ItemOutput

        label, extra = item.label, item.extra
        if label is None:
            label, extra = self.refiner(item.cams, item.keys, item.rgb)
        width, height = item.size
        if label.shape != (height, width):
            # the mask must align with the original image; CAMs stay at the processed size (manifest: processed_size)
            label = np.asarray(Image.fromarray(np.asarray(label, np.uint8)).resize((width, height), Image.NEAREST))
        return ItemOutput(self._write(item, label, extra), item.info)

    def _write(self, item: ComputedCAMs, label, extra) -> list[Path]:
        arrays = dict(**item.arrays, **extra) if self.settings.save_arrays else None
        return write_label_files(Path(self.settings.out), item.name, label, item.keys, item.cams, arrays)


def write_label_files(out: Path, stem: str, label, keys, cams, arrays: Optional[dict] = None) -> list[Path]:
    """Write one image's ``masks/<stem>.png``, ``cams/<stem>.npz`` (``keys``, ``cams``) and, given
    ``arrays``, ``arrays/<stem>.npz``, each atomically (temp file in the same folder, fsync, rename).
    Returns the paths written."""
    import numpy as np

    from tag2mask.io.atomic import atomic_path
    from tag2mask.io.palette import save_label_png

    mask_path, cam_path = out / "masks" / f"{stem}.png", out / "cams" / f"{stem}.npz"
    save_label_png(mask_path, label)
    with atomic_path(cam_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keys=keys, cams=cams)
    outputs = [mask_path, cam_path]
    if arrays is not None:
        arr_path = out / "arrays" / f"{stem}.npz"
        with atomic_path(arr_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        outputs.append(arr_path)
    return outputs
