"""Data of the tiny-CLIP trainer: a pool of synthetic scenes in memory, batches with multi-positive targets.

Images come from pre-generated training scenes kept in memory (uint8) with a few caption variants
each; augmentation is random flips and 90-degree rotations (captions have no spatial words). A batch
drawn with an ``iteration`` depends only on (seed, iteration), so a resumed run repeats the
uninterrupted one.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tag2mask.clip.model import CLIP_MEAN, CLIP_STD
from tag2mask.clip.tokenizer import tokenize
from tag2mask.synth.captions import make_caption
from tag2mask.synth.scenes import generate_scene
from tag2mask.synth.splits import seed_for
from tag2mask.synth.world import NUM_OBJECT_CLASSES, OBJECT_CLASSES, STUFF_CLASSES
from tag2mask.tiny_clip.evaluation import CONCEPT_NAMES, EVAL_TEMPLATE

if TYPE_CHECKING:
    from tag2mask.tiny_clip.config import TrainConfig

__all__ = ["NUM_CONCEPTS", "concept_prompts", "all_prompt_variants", "concepts_from_caption", "ScenePool",
           "BatchSampler"]

NUM_CONCEPTS = len(CONCEPT_NAMES)
_N_CAPTIONS = 4  # caption variants stored per pooled scene

_OBJECT_TEMPLATES = (
    "a photo of a {name}.", "a photo of a {name}.", "a photo of the {name}.", "a {name}.", "{name}",
    "a picture of a {name}.", "an image of a {name}.", "a photo of a {colour} {name}.", "a {colour} {name}.",
    "a rendering of a {name}.", "there is a {name} in the picture.", "a close-up photo of a {name}.",
)
_STUFF_TEMPLATES = (
    "a photo of {phrase}.", "a photo of a {name}.", "{phrase}", "a picture of {phrase}.", "an image of {phrase}.",
    "a photo of {name}.", "{name}",
)


def concept_prompts(rng: random.Random) -> list[str]:
    """One prompt per concept (12 objects then 6 stuff), templates drawn at random from ``rng``."""
    out = []
    for c in OBJECT_CLASSES:
        t = EVAL_TEMPLATE if rng.random() < 0.5 else rng.choice(_OBJECT_TEMPLATES)
        out.append(t.replace("{name}", c.name).replace("{colour}", c.colour_name).replace("{}", c.name))
    for s in STUFF_CLASSES:
        t = EVAL_TEMPLATE if rng.random() < 0.3 else rng.choice(_STUFF_TEMPLATES)
        out.append(t.replace("{name}", s.name).replace("{phrase}", rng.choice(s.phrases)).replace("{}", s.name))
    return out


def all_prompt_variants() -> list[list[str]]:
    """Every training prompt of every concept: ``variants[c]`` is a list of strings."""
    out = []
    for c in OBJECT_CLASSES:
        out.append(sorted({t.replace("{name}", c.name).replace("{colour}", c.colour_name) for t in _OBJECT_TEMPLATES}))
    for s in STUFF_CLASSES:
        out.append(sorted({t.replace("{name}", s.name).replace("{phrase}", p) for t in _STUFF_TEMPLATES for p in s.phrases}))
    return out


# ----------------------------------------------------------------------------------------------------
# data


def concepts_from_caption(caption: str) -> np.ndarray:
    """Multi-hot (18,) of the concepts a caption names (object names, possibly plural, and stuff)."""
    import re

    words = set(re.findall(r"[a-z]+", caption.lower()))
    hot = np.zeros(NUM_CONCEPTS, dtype=np.float32)
    for k, name in enumerate(CONCEPT_NAMES):
        plural = name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")
        if name in words or plural in words:
            hot[k] = 1.0
    return hot


def _make_pool_item(args: tuple[int, int]) -> tuple[np.ndarray, list[str], np.ndarray]:
    seed, size = args
    s = generate_scene(seed, size)
    rng = np.random.default_rng(seed + 7919)
    ids = [o.class_id for o in s.objects]
    caps = [s.caption] + [make_caption(rng, ids, s.stuff) for _ in range(_N_CAPTIONS - 1)]
    hot = concepts_from_caption(s.caption)
    return s.image, caps, hot


class ScenePool:
    """``n`` training scenes in memory: images (n, H, W, 3) uint8, caption tokens, concept multi-hots."""

    def __init__(self, n: int, size: int, base_seed: int = 0, workers: int = 0, progress: bool = True):
        from tqdm import tqdm

        jobs = [(seed_for("train", i, base_seed), size) for i in range(n)]
        workers = workers or (os.cpu_count() or 1)
        self.images = np.empty((n, size, size, 3), dtype=np.uint8)
        captions: list[str] = []
        self.concepts = np.empty((n, NUM_CONCEPTS), dtype=np.float32)
        if workers > 1 and n > 64:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as p:
                it = p.imap(_make_pool_item, jobs, chunksize=32)
                for i, (img, caps, hot) in enumerate(tqdm(it, total=n, desc="scene pool", disable=not progress)):
                    self.images[i], self.concepts[i] = img, hot
                    captions.extend(caps)
        else:
            for i, job in enumerate(tqdm(jobs, desc="scene pool", disable=not progress)):
                img, caps, hot = _make_pool_item(job)
                self.images[i], self.concepts[i] = img, hot
                captions.extend(caps)
        tokens = tokenize(captions)
        length = int((tokens != 0).sum(dim=1).max())
        self.tokens = tokens[:, :length].reshape(n, _N_CAPTIONS, length)
        # concept set id per scene: captions are positives for images with an identical set
        keys = {}
        self.set_ids = np.array([keys.setdefault(tuple(h.astype(int)), len(keys)) for h in self.concepts], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)


class BatchSampler:
    """Draws batches from a :class:`ScenePool` on ``device``: images, texts and multi-positive targets."""

    def __init__(self, pool: ScenePool, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.images = torch.from_numpy(pool.images).to(device)  # uint8 (n, H, W, 3)
        self.concepts = torch.from_numpy(pool.concepts).to(device)
        self.set_ids = torch.from_numpy(pool.set_ids).to(device)
        self.caption_tokens = pool.tokens.to(device)
        variants = all_prompt_variants()
        flat = [t for v in variants for t in v]
        toks = tokenize(flat)
        self.prompt_tokens = toks[:, : int((toks != 0).sum(1).max())].to(device)
        self.prompt_offsets = torch.tensor(np.cumsum([0] + [len(v) for v in variants])[:-1], device=device)
        self.prompt_counts = torch.tensor([len(v) for v in variants], device=device)
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(cfg.seed)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen).to(self.device)

    def sample(self, iteration: Optional[int] = None) -> dict[str, torch.Tensor]:
        """A batch; with ``iteration`` it depends only on (seed, iteration) (exact resume), else on the draws so far."""
        if iteration is not None:
            self.gen.manual_seed(self.cfg.seed * 1_000_003 + int(iteration))
        b = self.cfg.batch_size
        n = self.images.shape[0]
        idx = torch.randint(0, n, (b,), generator=self.gen).to(self.device)
        img = self.images[idx].permute(0, 3, 1, 2).float().div_(255.0)
        # augmentation: flips and 90-degree rotations, per image
        flip_h = self._rand(b) < 0.5
        flip_v = self._rand(b) < 0.5
        rot = self._rand(b) < 0.5
        img = torch.where(flip_h.view(-1, 1, 1, 1), img.flip(3), img)
        img = torch.where(flip_v.view(-1, 1, 1, 1), img.flip(2), img)
        img = torch.where(rot.view(-1, 1, 1, 1), img.transpose(2, 3), img)
        img = (img - self.mean) / self.std

        hot = self.concepts[idx]  # (b, 18)
        use_caption = self._rand(b) < self.cfg.caption_prob
        # the prompt concept: a random present object (or the stuff with stuff_prompt_prob)
        obj_w = hot[:, :NUM_OBJECT_CLASSES]
        weights = (obj_w + 1e-9 * (obj_w.sum(1, keepdim=True) == 0)).cpu()
        pick_obj = torch.multinomial(weights, 1, generator=self.gen).squeeze(1).to(self.device)
        stuff_idx = NUM_OBJECT_CLASSES + hot[:, NUM_OBJECT_CLASSES:].argmax(1)
        use_stuff = self._rand(b) < self.cfg.stuff_prompt_prob
        concept = torch.where(use_stuff, stuff_idx, pick_obj)
        var = (self._rand(b) * self.prompt_counts[concept]).long().clamp_max(self.prompt_counts[concept] - 1)
        p_tok = self.prompt_tokens[self.prompt_offsets[concept] + var]
        cap_var = torch.randint(0, _N_CAPTIONS, (b,), generator=self.gen).to(self.device)
        c_tok = self.caption_tokens[idx, cap_var]
        length = max(p_tok.shape[1], c_tok.shape[1])
        p_tok = F.pad(p_tok, (0, length - p_tok.shape[1]))
        c_tok = F.pad(c_tok, (0, length - c_tok.shape[1]))
        tokens = torch.where(use_caption.view(-1, 1), c_tok, p_tok)
        tokens = tokens[:, : int((tokens != 0).sum(1).max())]

        # positives[i, j]: text j fits image i
        sets = self.set_ids[idx]
        pos_caption = sets.view(-1, 1) == sets.view(1, -1)
        pos_prompt = hot[:, concept] > 0  # (i, j) = image i contains text j's concept
        positives = torch.where(use_caption.view(1, -1), pos_caption, pos_prompt)
        positives |= torch.eye(b, dtype=torch.bool, device=self.device)
        return {"images": img, "tokens": tokens, "positives": positives, "concepts": hot}
