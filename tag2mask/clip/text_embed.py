"""Text-embedding construction (template ensembling) with an on-disk cache.

For every prompt name the templates are filled in, tokenized, encoded, L2-normalised, averaged
over templates and L2-normalised again -- the ``zeroshot_classifier`` recipe used by CLIP-ES,
WeCLIP and MaskCLIP.

Cache: one ``.npy`` file per (model fingerprint, templates, names) under ``cache_dir``; the
default folder is ``$TAG2MASK_CACHE/text`` when that variable is set, else
``~/.cache/tag2mask/text``.  ``cache_dir=False`` disables caching.  Files are written to a
temporary name in the same folder and moved into place with ``os.replace`` so concurrent runs
never read a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from tag2mask.clip.tokenizer import tokenize

if TYPE_CHECKING:  # avoid importing the vocab package at import time of the clip package
    from tag2mask.vocab.vocabulary import Vocabulary

CacheDir = Union[str, os.PathLike, bool, None]
_CACHE_VERSION = 1  # bump when the embedding recipe changes, so old files are ignored


@dataclass
class TextEmbeddings:
    """Prompt embeddings of a vocabulary.

    Attributes:
        features: ``(S, D)`` float32, L2-normalised; one row per prompt (class synonym).
        class_index: ``(S,)`` int64, the class of each row (values in ``0..num_classes-1``).
        num_classes: K.
    """

    features: torch.Tensor
    class_index: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(f"features must be (S, D), got shape {tuple(self.features.shape)}")
        if self.class_index.shape != (self.features.shape[0],):
            raise ValueError(
                f"class_index must be ({self.features.shape[0]},), got {tuple(self.class_index.shape)}"
            )
        present = torch.unique(self.class_index)
        if present.numel() != self.num_classes or (present != torch.arange(self.num_classes, device=present.device)).any():
            raise ValueError(f"class_index must cover every class 0..{self.num_classes - 1} at least once")

    @property
    def is_one_per_class(self) -> bool:
        """True when each class has exactly one row in class order (``reduce`` is the identity)."""
        return self.features.shape[0] == self.num_classes and bool(
            (self.class_index == torch.arange(self.num_classes, device=self.class_index.device)).all()
        )

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "TextEmbeddings":
        """Copy moved to ``device`` / cast to ``dtype`` (class_index stays int64)."""
        return TextEmbeddings(
            self.features.to(device=device, dtype=dtype), self.class_index.to(device), self.num_classes
        )

    def select(
        self, class_ids: Sequence[int], append: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """The text matrix of a few classes, as softmax-GradCAM needs it.

        Args:
            class_ids: classes in the order wanted (an image's labels); repeats are kept.
            append: ``(M, D)`` rows put after them (e.g. the background words), or ``None``.

        Returns:
            ``features (T, D)`` = [every row of class_ids[0], every row of class_ids[1], ..., append]
            and, per requested class, the positions of its rows in that matrix (its synonyms).
        """
        rows: list[int] = []
        targets: list[list[int]] = []
        index = self.class_index
        for cid in class_ids:
            cid = int(cid)
            if not 0 <= cid < self.num_classes:
                raise ValueError(f"class id {cid} is outside the vocabulary (0..{self.num_classes - 1})")
            own = torch.nonzero(index == cid).flatten().tolist()
            targets.append(list(range(len(rows), len(rows) + len(own))))
            rows.extend(own)
        feats = self.features[torch.tensor(rows, dtype=torch.long, device=self.features.device)]
        if append is not None and append.shape[0]:
            feats = torch.cat([feats, append.to(device=feats.device, dtype=feats.dtype)], dim=0)
        return feats, targets

    def reduce(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-prompt scores ``(..., S)`` -> per-class scores ``(..., K)``, max over each class's rows."""
        if scores.shape[-1] != self.features.shape[0]:
            raise ValueError(f"scores last dim {scores.shape[-1]} != number of prompts {self.features.shape[0]}")
        if self.is_one_per_class:
            return scores
        index = self.class_index.to(scores.device).expand(scores.shape)
        out = torch.full(
            (*scores.shape[:-1], self.num_classes), float("-inf"), dtype=scores.dtype, device=scores.device
        )
        return out.scatter_reduce(-1, index, scores, reduce="amax", include_self=True)


def default_cache_dir() -> Path:
    """``$TAG2MASK_CACHE/text`` if set, else ``~/.cache/tag2mask/text``."""
    root = os.environ.get("TAG2MASK_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "tag2mask"
    return base / "text"


def _resolve_cache_dir(cache_dir: CacheDir) -> Optional[Path]:
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def cache_key(fingerprint: str, templates: Sequence[str], names: Sequence[str]) -> str:
    """sha256 hex digest identifying one embedding matrix."""
    payload = json.dumps(
        {"v": _CACHE_VERSION, "model": fingerprint, "templates": list(templates), "names": list(names)},
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# Fingerprints that do not identify the weights (every randomly initialised model shares them).
_UNCACHEABLE_FINGERPRINTS = frozenset({"", "random-init"})


def _model_fingerprint(model: torch.nn.Module) -> Optional[str]:
    fp = getattr(model, "fingerprint", None)
    if fp is None or str(fp) in _UNCACHEABLE_FINGERPRINTS:
        return None
    return str(fp)


def _load_cached(path: Path, rows: int) -> Optional[torch.Tensor]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # missing or corrupt: recompute and overwrite
    if arr.ndim != 2 or arr.shape[0] != rows or arr.dtype != np.float32:
        return None
    return torch.from_numpy(arr)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def embed_names(
    model: torch.nn.Module,
    names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
    cache_dir: CacheDir = None,
) -> torch.Tensor:
    """Template-ensembled text embeddings.

    Args:
        model: has ``encode_text(tokens (N, 77) int64) -> (N, D)`` and ``fingerprint: str``
            (nothing is cached without a fingerprint or for ``"random-init"``).
        names: prompt names, each substituted into every template.
        templates: format strings with one ``{}``.
        batch_size: max sentences per ``encode_text`` call.
        device: where tokens are sent; defaults to the model's parameter device.
        cache_dir: folder, ``None`` for the default, ``False`` to disable.

    Returns:
        ``(len(names), D)`` float32 on CPU, rows L2-normalised.
    """
    names = [str(n) for n in names]
    templates = [str(t) for t in templates]
    if not names:
        raise ValueError("embed_names: no names to embed")
    if not templates:
        raise ValueError("embed_names: no templates; use e.g. ('a photo of a {}.',)")
    folder = _resolve_cache_dir(cache_dir)
    fingerprint = _model_fingerprint(model)
    path = None
    if folder is not None and fingerprint is not None:
        path = folder / f"{cache_key(fingerprint, templates, names)}.npy"
        hit = _load_cached(path, len(names))
        if hit is not None:
            return hit

    dev = torch.device(device) if device is not None else _model_device(model)
    sentences = [t.format(n) for n in names for t in templates]  # name-major: rows n*T .. n*T+T-1
    chunks = []
    for start in range(0, len(sentences), batch_size):
        tokens = tokenize(sentences[start : start + batch_size]).to(dev)
        feats = model.encode_text(tokens)
        if feats.dtype != torch.float16:
            feats = feats.float()
        # a float16 tower (WeCLIP's official numerics) is normalised and averaged in float16, as the
        # official zero-shot classifier does; the result is returned as float32 (exact)
        chunks.append((feats / feats.norm(dim=-1, keepdim=True)).cpu())
    per_sentence = torch.cat(chunks)  # (N*T, D)
    per_name = per_sentence.view(len(names), len(templates), -1).mean(dim=1)
    out = (per_name / per_name.norm(dim=-1, keepdim=True)).float().contiguous()

    if path is not None:
        try:
            _save_atomic(path, out.numpy())
        except OSError:
            pass  # a read-only cache must not break inference; it only costs recomputation
    return out


def _build(model, groups: Sequence[Sequence[str]], templates, cache_dir, batch_size, device) -> TextEmbeddings:
    flat = [p for g in groups for p in g]
    index = [k for k, g in enumerate(groups) for _ in g]
    feats = embed_names(model, flat, templates, batch_size=batch_size, device=device, cache_dir=cache_dir)
    return TextEmbeddings(feats, torch.tensor(index, dtype=torch.long), len(groups))


def embed_vocabulary(
    model: torch.nn.Module,
    vocab: "Vocabulary",
    templates: Sequence[str],
    cache_dir: CacheDir = None,
    *,
    batch_size: int = 256,
    device: Union[str, torch.device, None] = None,
) -> tuple[TextEmbeddings, Optional[TextEmbeddings]]:
    """Embed a vocabulary's class prompts and its background words.

    Returns:
        ``(classes, background)``: classes has K = ``len(vocab)`` classes and one row per prompt
        (``vocab.prompt_names()``); background has one class per background word, or is ``None``
        when the vocabulary has none.
    """
    from tag2mask.vocab.templates import get_templates

    templates = get_templates(templates) if isinstance(templates, str) else tuple(templates)
    fg = _build(model, vocab.prompt_names(), templates, cache_dir, batch_size, device)
    bg = None
    if vocab.background:
        bg = _build(model, [(w,) for w in vocab.background], templates, cache_dir, batch_size, device)
    return fg, bg


__all__ = ["TextEmbeddings", "embed_names", "embed_vocabulary", "cache_key", "default_cache_dir"]
