"""What the web server computes: an upload -> an image, class text -> a vocabulary, then the masks.

Nothing here knows HTTP. Every problem with a request raises :class:`RequestError` (a message for
the user and an HTTP status). A request never names a server file: class lists are parsed inline
only (a class-name *file* is a command-line feature).
"""

from __future__ import annotations

import io
import re
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tag2mask.data.images import fit_max_pixels, to_rgb
from tag2mask.methods import registry
from tag2mask.vocab.vocabulary import PRESETS, Vocabulary, get_vocabulary, parse_class_string

__all__ = [
    "MAX_IMAGE_PIXELS", "MAX_WORK_PIXELS", "MAX_CLASS_CHARS", "MAX_PROMPTS", "TOY_MODEL_NOTE",
    "RequestError", "MethodResult", "SegmentService", "parse_classes", "decode_upload", "is_shipped_tiny_clip",
]

#: uploads with more pixels are refused before decoding (decompression bombs)
MAX_IMAGE_PIXELS = 16_000_000
#: larger images are segmented at this many pixels (aspect kept) and their mask scaled back (nearest):
#: the full-size logits of a 16 MP image would take gigabytes
MAX_WORK_PIXELS = 4_000_000
MAX_CLASS_CHARS = 2000
#: class names + synonyms + background words per request (each is embedded with every template)
MAX_PROMPTS = 64
TOY_MODEL_NOTE = (
    "This server runs the tiny CLIP shipped with tag2mask: it knows only the synthetic shapes world; "
    "pass --weights ViT-B-16.pt for real images."
)
_BYTESIO_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


class RequestError(ValueError):
    """A request the server cannot serve: ``status`` (4xx/5xx) and a message for the user."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", "~", "./", "../", "\\")) or _WINDOWS_DRIVE.match(text):
        return True
    return "," not in text and ";" not in text and text.lower().endswith((".txt", ".names", ".csv"))


def parse_classes(text: str) -> Vocabulary:
    """Inline class list (``'cat, dog|puppy; background: sky'``) or a preset name -> vocabulary.

    Raises:
        RequestError: empty, too long, too many prompts, path-like, or malformed.
    """
    text = (text or "").strip()
    if not text:
        raise RequestError("the class list is empty; type e.g. 'cat, dog; background: sky'")
    if len(text) > MAX_CLASS_CHARS:
        raise RequestError(f"the class list has {len(text):,} characters; at most {MAX_CLASS_CHARS:,} are accepted")
    if text.lower() in PRESETS:
        vocab = get_vocabulary(text)
    elif _looks_like_path(text):
        raise RequestError(
            "type the class names (e.g. 'cat, dog; background: sky'): the server never reads files; "
            "a class-name file is a command-line feature (tag2mask segment --classes FILE)"
        )
    else:
        try:
            vocab = parse_class_string(text)
        except ValueError as e:
            raise RequestError(f"bad class list: {e}") from e
    prompts = sum(len(s) for s in vocab.synonyms) + len(vocab.background)
    if prompts > MAX_PROMPTS:
        raise RequestError(
            f"the class list has {prompts} names (classes, synonyms and background words); at most {MAX_PROMPTS} "
            "per request (use tag2mask segment for larger vocabularies)"
        )
    return vocab


def decode_upload(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Uploaded bytes -> RGB image with the library's decoding policy (EXIF applied, alpha on black).

    Raises:
        RequestError: nothing uploaded, not an image, corrupt, or more than ``max_pixels`` (413).
    """
    if not data:
        raise RequestError("no image was uploaded (form field 'image')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise RequestError(f"the image is {width}x{height} = {width * height:,} pixels; at most "
                                   f"{max_pixels:,} are accepted", status=413)
            img.seek(0)
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise RequestError(f"the image claims more pixels than the server accepts (at most {max_pixels:,} pixels; "
                           "a decompression bomb?)", status=413) from e
    except UnidentifiedImageError as e:
        raise RequestError("the upload is not an image in a format the server reads (PNG, JPEG, WebP, BMP, GIF, TIFF)") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise RequestError(f"the image data is corrupt or truncated ({_clean(e)})") from e


def _clean(exc: BaseException) -> str:
    """An exception's text without Python object reprs (``<_io.BytesIO object at 0x…>``)."""
    return _BYTESIO_REPR.sub("the upload", str(exc)) or type(exc).__name__


def is_shipped_tiny_clip(model: Any) -> bool:
    """Whether ``model`` was loaded from the tiny CLIP inside the package (it knows only synthetic scenes)."""
    source = getattr(model, "source_path", None)
    if not source:
        return False
    shipped = Path(__file__).resolve().parent.parent / "assets" / "tiny_clip.safetensors"
    try:
        return Path(source).resolve() == shipped
    except OSError:
        return False


@dataclass
class MethodResult:
    """One method's answer: ``label`` ``(H, W)`` uint8 at the image's size, indices into ``class_names``."""

    method: str
    label: np.ndarray
    class_names: tuple[str, ...]
    has_background: bool
    seconds: float

    @property
    def present(self) -> list[str]:
        values = np.unique(self.label)
        return [self.class_names[v] for v in values if v < len(self.class_names) and not (self.has_background and v == 0)]


class SegmentService:
    """The model and a small cache of segmenters; one computation at a time (a lock), so memory stays flat.

    Which methods it offers is decided per model: every method of the registry's web list
    (:func:`~tag2mask.methods.registry.serve_methods`) whose ``supports`` check passes for ``model`` and
    whose ``needs`` are met by ``inputs``; the others are in ``unavailable`` with the reason.

    Args:
        model: a loaded CLIP.
        short_side: the segmenters' working short side (448, as ``tag2mask segment``).
        max_work_pixels: images above this are segmented downscaled, the mask scaled back.
        cache_size: how many (vocabulary, method, mode) segmenters are kept.
        inputs: ``method -> extra keyword arguments of its predictor factory`` built at start-up
            (:func:`~tag2mask.methods.registry.method_inputs`: e.g. CorrCLIP's DINO and region source).
    """

    def __init__(self, model: Any, short_side: int = 448, max_work_pixels: int = MAX_WORK_PIXELS,
                 cache_size: int = 16, inputs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        self.model = model
        self.inputs = {k: dict(v) for k, v in (inputs or {}).items()}
        #: the methods offered, the default first, and ``{method: why it is not offered}``
        self.methods, self.unavailable = registry.offered(registry.serve_methods(), model, self.inputs)
        if not self.methods:
            raise ValueError("no method of the web demo runs with this model: "
                             + "; ".join(f"{m}: {why}" for m, why in self.unavailable.items()))
        self.short_side = short_side
        self.max_work_pixels = max_work_pixels
        self.cache_size = cache_size
        self.toy_model = is_shipped_tiny_clip(model)
        self._cache: "OrderedDict[tuple[Vocabulary, str, str], Any]" = OrderedDict()
        self._lock = threading.Lock()
        self._sample: Optional[tuple[Image.Image, list[MethodResult]]] = None

    def describe_model(self) -> str:
        """What the page says about the model: architecture only, never a server path."""
        config = getattr(self.model, "config", None)
        arch = config.describe() if config is not None and hasattr(config, "describe") else "CLIP"
        return f"tiny CLIP shipped with tag2mask ({arch})" if self.toy_model else f"CLIP {arch}"

    def method_list(self) -> dict[str, Any]:
        """What ``GET /api/methods`` answers: the methods offered (the default first) and why the others are not."""
        return {"methods": list(self.methods), "default": self.methods[0], "unavailable": dict(self.unavailable),
                "toy_model": self.toy_model}

    def _segmenter(self, vocab: Vocabulary, method: str, mode: str) -> Any:
        key = (vocab, method, mode)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            seg = registry.load(registry.get(method).predictor)(self.model, vocab, method, mode=mode,
                                                                   short_side=self.short_side,
                                                                   **self.inputs.get(method, {}))
        except ValueError as e:  # e.g. more labels than an 8-bit map holds
            raise RequestError(f"bad class list: {e}") from e
        self._cache[key] = seg
        while len(self._cache) > self.cache_size:  # memory stays bounded: forget the least recently used
            self._cache.popitem(last=False)
        return seg

    def sample(self, classes: str, method: str) -> tuple[Image.Image, list[MethodResult]]:
        """A synthetic scene segmented with ``classes`` by ``method``: what the page shows before any upload.

        Computed on the first call and kept (one scene, a few hundred KB), so opening the page stays fast.
        """
        if self._sample is None:
            from tag2mask.synth.scenes import generate_scene

            image = Image.fromarray(generate_scene(seed=0).image)
            results, _ = self.segment(image, parse_classes(classes), [method])
            self._sample = (image, results)
        return self._sample

    def segment(self, image: Image.Image, vocab: Vocabulary, methods: Sequence[str], mode: str = "whole"
                ) -> tuple[list[MethodResult], Optional[tuple[int, int]]]:
        """Run each of ``methods`` -> (results at the image's size, the processed ``(h, w)`` if downscaled)."""
        bad = [m for m in methods if m not in self.methods]
        if bad and bad[0] in self.unavailable:
            raise RequestError(f"method {bad[0]!r} is not offered by this server: {self.unavailable[bad[0]]}")
        if bad or not methods:
            raise RequestError(f"unknown method {bad[0] if bad else ''!r}; choose one of {', '.join(self.methods)}")
        if mode not in ("whole", "slide"):
            raise RequestError(f"unknown mode {mode!r}; choose whole or slide")
        width, height = image.size
        w, h = fit_max_pixels(width, height, self.max_work_pixels)
        work = image if (w, h) == (width, height) else image.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
        results = []
        with self._lock:
            for method in methods:
                seg = self._segmenter(vocab, method, mode)
                start = time.perf_counter()
                res = seg.predict(work)
                label = res.label
                if (w, h) != (width, height):
                    label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
                results.append(MethodResult(method, label, tuple(res.class_names), bool(res.has_background),
                                            round(time.perf_counter() - start, 3)))
        return results, (None if (w, h) == (width, height) else (h, w))
