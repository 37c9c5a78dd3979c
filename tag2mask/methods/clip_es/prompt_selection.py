"""CLIP-ES's sharpness-based prompt selection (paper Sec. 3.3, Eq. 9), on the user's own images and tags.

The official code ships only the result of the selection (``'a clean origami {}.'``); the maintainer
describes the procedure as: classify every image with the original CLIP under each candidate
template, and compute the prompt's *sharpness* from the scores (issue #18 of the official repository).
Here, for a template ``t`` and a multi-label image ``i`` with ground-truth classes ``C_i``:

    p_i = softmax over all K classes of 100 * cos(CLIP image embedding, text embedding of t(class))
    s_i = (p_i[c] for c in C_i)                          # the scores of the image's own classes
    sharpness(t) = mean_i  var(s_i) / mean(s_i)          # dispersion (variance-to-mean ratio)

over the images with at least two classes (a single score has no dispersion). A low sharpness means
the template spreads the probability evenly over all the classes an image contains instead of
letting one dominate, which is what softmax-GradCAM needs; the paper picks the template with the
lowest sharpness. Conventions not fixed by the paper, chosen here and documented in docs/clip_es.md:
the population variance (``ddof=0``); the mean over images (the paper's sum gives the same ranking
for a fixed image set); a class with several synonym prompts scores the sum of their probabilities
(as in softmax-GradCAM); the image embedding is standard CLIP's (CLS token), the image resized so its
short side is the model's input size and centre-cropped, as CLIP's own preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tag2mask.clip.model import CLIP, CLIP_MEAN, CLIP_STD
from tag2mask.clip.text_embed import embed_vocabulary
from tag2mask.data.transforms import to_normalized_tensor
from tag2mask.vocab.vocabulary import Vocabulary

__all__ = ["TemplateScore", "sharpness", "clip_class_probabilities", "class_probabilities", "encode_images",
           "rank_templates", "clip_preprocess"]


@dataclass(frozen=True)
class TemplateScore:
    """One candidate template's result: lower ``sharpness`` is better.

    Attributes:
        template: the template (``'a clean origami {}.'``).
        sharpness: Eq. 9 over the multi-label images (``nan`` when there is none).
        images: number of multi-label images that entered the score.
        mean_label_prob: mean softmax probability of the images' own classes (all images), for context.
    """

    template: str
    sharpness: float
    images: int
    mean_label_prob: float


def sharpness(label_scores: Iterable[Sequence[float]]) -> tuple[float, int]:
    """Eq. 9 from the scores of each image's own classes: ``(mean_i var(s_i) / mean(s_i), n_images)``.

    Images with fewer than two classes are skipped; ``nan`` if none is left.
    """
    ratios = []
    for s in label_scores:
        s = np.asarray(s, dtype=np.float64)
        if s.size < 2:
            continue
        mean = s.mean()
        ratios.append(s.var() / mean if mean > 0 else np.inf)
    return (float(np.mean(ratios)) if ratios else float("nan")), len(ratios)


def clip_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP's own preprocessing: bicubic resize of the short side to ``size``, centre crop, normalise.

    ``(W, H)`` PIL image → ``(1, 3, size, size)`` float32.
    """
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return to_normalized_tensor(image.crop((left, top, left + size, top + size)), CLIP_MEAN, CLIP_STD)


@torch.no_grad()
def encode_images(model: CLIP, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """Standard CLIP image embeddings, L2-normalised: ``(N, D)`` float32 on the model's device.

    They do not depend on the template, so :func:`rank_templates` computes them once for all templates.
    """
    device = next(model.parameters()).device
    size = model.visual.image_size
    feats = []
    for start in range(0, len(images), batch_size):
        x = torch.cat([clip_preprocess(im, size) for im in images[start : start + batch_size]]).to(device)
        feats.append(F.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(feats) if feats else torch.zeros(0, model.text_projection.shape[1], device=device)


@torch.no_grad()
def class_probabilities(model: CLIP, image_feats: torch.Tensor, text: torch.Tensor, class_index: torch.Tensor,
                        num_classes: int) -> np.ndarray:
    """Zero-shot class probabilities from image embeddings: ``(N, K)`` float64, rows summing to 1.

    image_feats: ``(N, D)`` from :func:`encode_images`; text: ``(S, D)`` L2-normalised prompt
    embeddings, ``class_index`` ``(S,)`` the class of each row; a class's probability is the sum over
    its rows of the softmax over all ``S`` rows.
    """
    device = image_feats.device
    scale = float(model.logit_scale.exp())
    probs = (scale * image_feats @ text.to(device).float().t()).softmax(dim=-1).double()
    per_class = torch.zeros(probs.shape[0], num_classes, dtype=torch.float64, device=device)
    per_class.index_add_(1, class_index.to(device), probs)
    return per_class.cpu().numpy()


def clip_class_probabilities(model: CLIP, images: Sequence[Image.Image], text: torch.Tensor,
                             class_index: torch.Tensor, num_classes: int, batch_size: int = 16) -> np.ndarray:
    """Zero-shot class probabilities of standard CLIP: ``(N, K)`` float64, rows summing to 1.

    text: ``(S, D)`` L2-normalised prompt embeddings, ``class_index`` ``(S,)`` the class of each row.
    Encodes the images; to score several templates, encode once with :func:`encode_images` and call
    :func:`class_probabilities` per template.
    """
    if not images:
        return np.zeros((0, num_classes))
    return class_probabilities(model, encode_images(model, images, batch_size), text, class_index, num_classes)


def rank_templates(
    model: CLIP,
    images: Sequence[Image.Image],
    label_lists: Sequence[Sequence[int]],
    vocab: Vocabulary,
    templates: Sequence[str],
    *,
    batch_size: int = 16,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> list[TemplateScore]:
    """Score every template on the images and their labels; best (lowest sharpness) first.

    Args:
        model: a CLIP (any image tower; the original CLIP classification is used, not CLIP-ES's).
        images: PIL images.
        label_lists: per image, its 0-based class ids in ``vocab``.
        vocab: the classes (synonyms and background words: background words are not classes here).
        templates: candidate templates, each with one ``{}``.
        batch_size: images per forward pass.
        progress: optional wrapper around the template loop (e.g. ``tqdm``).
    """
    if len(images) != len(label_lists):
        raise ValueError(f"{len(images)} images but {len(label_lists)} label lists")
    if not images:
        raise ValueError("prompt selection needs at least one image with its labels")
    k = len(vocab)
    for ids in label_lists:
        bad = [i for i in ids if not 0 <= int(i) < k]
        if bad:
            raise ValueError(f"label ids {bad} outside the vocabulary's {k} classes")
    classes_only = Vocabulary(vocab.names, vocab.synonyms, (), vocab.mode)
    image_feats = encode_images(model, images, batch_size)  # once: only the text side depends on the template
    results = []
    for template in progress(templates) if progress else templates:
        fg, _ = embed_vocabulary(model, classes_only, [template], cache_dir=False)
        probs = class_probabilities(model, image_feats, fg.features, fg.class_index, k)
        own = [probs[n, list(dict.fromkeys(int(i) for i in ids))] for n, ids in enumerate(label_lists)]
        value, n_multi = sharpness(own)
        mean_prob = float(np.mean(np.concatenate([o for o in own if o.size]))) if any(o.size for o in own) else float("nan")
        results.append(TemplateScore(template, value, n_multi, mean_prob))
    return sorted(results, key=lambda r: (np.isnan(r.sharpness), r.sharpness))
