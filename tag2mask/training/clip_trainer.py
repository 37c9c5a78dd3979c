"""Contrastive training of a tiny CLIP on the synthetic world (:mod:`tag2mask.synth`).

There are no real CLIP weights on an offline machine, so the demos and quality benchmarks use a tiny
CLIP trained here from scratch. Training sees images and **text only**: image-level concepts are
read off the captions (every object class and the stuff are named in a caption); no pixel mask is
ever used for training (masks are used only by the optional evaluation diagnostics).

Losses (all label-free at the pixel level):

* **contrastive** (weight ``w_clip``): symmetric InfoNCE between image embeddings and one text per
  image. The text is the image's caption (probability ``caption_prob``; a fresh caption variant) or a
  class-level prompt such as ``"a photo of a star."`` for one concept present in the image. A batch
  can hold several texts that fit an image (two images of stars both fit "a photo of a star."), so
  targets are **multi-positive**: a caption is positive for every image with the same concept set, a
  prompt for every image that contains its concept; the target distribution is uniform over the
  positives (rows for image->text, columns for text->image). Computed for two image embeddings: the
  standard CLS embedding and the mean of the patch tokens after ``ln_post``/``proj`` (the embedding
  CLIP-ES's GradCAM differentiates); the two losses are averaged.
* **text-as-classifier BCE** (``w_bce``): both image embeddings against the text embeddings of all 18
  concept prompts (12 object classes + 6 stuff), ``sigmoid(s * cos + b)`` with a multi-hot target from
  the caption. Directly optimises zero-shot multi-label ranking.
* **dense MIL** (``w_dense``): patch features of the last block in three forms -- standard tokens,
  MaskCLIP's value path (``x + out_proj(v)`` then the FFN) and the residual-free value path used by
  ClearCLIP/NACLIP-style methods -- go through ``ln_post``/``proj``, are compared with the 18 concept
  texts, a softmax over concepts is taken per patch, and the top-k mean over patches of each concept's
  probability is trained with BCE against the caption's concepts. Absent concepts must win no patch,
  present ones some patches, so patches learn the concept at their own location.
* **attention affinity** (``w_attn``, off by default; on for the shipped model): the head-averaged
  patch-to-patch attention of every block from ``attn_from_block`` on (CLS row and column dropped,
  rows renormalised, as CLIP-ES's affinity does) is pulled, by KL divergence, towards the affinity of
  the model's own final dense features, ``softmax_j(cos(f_i, f_j) / attn_tau)``, with the features
  detached; it starts at ``attn_start`` of the schedule, once those features mean something. Why: a
  large CLIP's deep attention links the patches of one object (the premise of CLIP-ES's CAA), but a
  6-block model trained for minutes does not develop this, and its last block's patch-to-patch
  attention receives no gradient at all from image-level losses (only the CLS output is used). The
  target is built from the model's own features, never from masks.

Images come from a pool of pre-generated training scenes kept in memory (uint8) with a few caption
variants each; augmentation is random flips and 90-degree rotations (captions have no spatial words).

CLI::

    python -m tag2mask.training.clip_trainer --out runs/tiny --steps 6000 --batch-size 256 --device auto
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tag2mask.clip.loading import save_clip
from tag2mask.clip.model import CLIP, CLIP_MEAN, CLIP_STD, CLIPConfig, TextConfig, VisionConfig
from tag2mask.clip.tokenizer import tokenize
from tag2mask.runtime import resolve_device
from tag2mask.training.clip_eval import (  # re-exported: the trainer reports them while training
    CONCEPT_NAMES,
    EVAL_TEMPLATE,
    average_precision,
    dense_miou,
    image_features,
    mean_average_precision,
    zero_shot_map,
)
from tag2mask.synth.captions import make_caption
from tag2mask.synth.scenes import generate_scene
from tag2mask.synth.splits import seed_for
from tag2mask.synth.world import NUM_OBJECT_CLASSES, OBJECT_CLASSES, STUFF_CLASSES

__all__ = [
    "TrainConfig", "ScenePool", "build_model", "train", "zero_shot_map", "average_precision",
    "mean_average_precision", "concept_prompts", "EVAL_TEMPLATE", "dense_miou", "save_half", "main",
]

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
# configuration and model


@dataclass
class TrainConfig:
    out: str = "runs/tiny_clip"
    steps: int = 6000
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.05
    warmup: int = 300
    grad_clip: float = 1.0
    time_budget_s: float = 0.0  # > 0: the schedule also advances with elapsed time and training stops when it is spent
    pool_size: int = 20000
    pool_workers: int = 0  # 0: os.cpu_count()
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 192
    vision_layers: int = 6
    text_width: int = 64
    text_layers: int = 3
    embed_dim: int = 128
    caption_prob: float = 0.5
    stuff_prompt_prob: float = 0.2
    w_clip: float = 1.0
    w_bce: float = 1.0
    w_dense: float = 1.0
    dense_topk: int = 4
    w_attn: float = 0.0
    attn_from_block: int = 0
    attn_tau: float = 0.1
    attn_start: float = 0.1
    bf16: bool = True
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    eval_every: int = 1000
    n_val: int = 200
    save_every: int = 1000


def model_config(cfg: TrainConfig) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=cfg.embed_dim,
        vision=VisionConfig(
            width=cfg.vision_width, layers=cfg.vision_layers, heads=max(1, cfg.vision_width // 64),
            image_size=cfg.image_size, patch_size=cfg.patch_size,
        ),
        text=TextConfig(width=cfg.text_width, layers=cfg.text_layers, heads=max(1, cfg.text_width // 64)),
    )


def build_model(config: CLIPConfig, seed: int = 0) -> CLIP:
    """A freshly initialised :class:`CLIP` with OpenAI-style small inits for the text embeddings."""
    torch.manual_seed(seed)
    model = CLIP(config)
    with torch.no_grad():
        nn.init.normal_(model.token_embedding.weight, std=0.02)
        nn.init.normal_(model.positional_embedding, std=0.01)
        model.logit_scale.fill_(math.log(1 / 0.07))
    return model


def save_half(model: CLIP, path: os.PathLike | str, metadata: Optional[dict[str, str]] = None) -> None:
    """Save ``model`` with fp16 tensors (``load_clip`` casts back to float32)."""
    import copy

    half = copy.deepcopy(model).cpu().half()
    half.config = model.config
    save_clip(half, path, metadata)


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

    def sample(self) -> dict[str, torch.Tensor]:
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
        pick_obj = torch.multinomial(obj_w + 1e-9 * (obj_w.sum(1, keepdim=True) == 0), 1, generator=None).squeeze(1)
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


# ----------------------------------------------------------------------------------------------------
# forward and losses


def multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with uniform targets over the positives of each row / column."""
    pos = positives.float()
    t_rows = pos / pos.sum(1, keepdim=True)
    t_cols = pos / pos.sum(0, keepdim=True)
    l_i2t = -(t_rows * logits.log_softmax(dim=1)).sum(1).mean()
    l_t2i = -(t_cols * logits.log_softmax(dim=0)).sum(0).mean()
    return 0.5 * (l_i2t + l_t2i)


class LossHead(nn.Module):
    """Trainer-only scalars (not part of the saved CLIP): BCE scale/bias and the dense softmax scale."""

    def __init__(self) -> None:
        super().__init__()
        self.bce_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bce_bias = nn.Parameter(torch.tensor(-4.0))
        self.dense_scale = nn.Parameter(torch.tensor(math.log(10.0)))


def attention_affinity_loss(attentions: Sequence[torch.Tensor], dense: torch.Tensor, tau: float) -> torch.Tensor:
    """KL from the (stop-gradient) affinity of the dense features to each block's patch attention.

    attentions: (B, 1 + n, 1 + n) head-averaged maps; dense: (B, n, D) patch features. The CLS row and
    column are dropped and the patch rows renormalised, as CAA does; the target row of patch i is
    ``softmax_j(cos(f_i, f_j) / tau)``.
    """
    f = F.normalize(dense.detach().float(), dim=-1)
    target = (f @ f.transpose(1, 2) / tau).softmax(dim=-1)
    total = dense.new_zeros((), dtype=torch.float32)
    for a in attentions:
        p = a[:, 1:, 1:].float()
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        total = total + (target * (target.clamp_min(1e-12).log() - p.clamp_min(1e-12).log())).sum(-1).mean()
    return total / max(1, len(attentions))


def compute_losses(
    model: CLIP, head: LossHead, batch: dict[str, torch.Tensor], concept_tokens: torch.Tensor, cfg: TrainConfig,
    attn_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    feats = image_features(model, batch["images"], attention_from=cfg.attn_from_block if attn_weight > 0 else None)
    txt = F.normalize(model.encode_text(batch["tokens"]).float(), dim=-1)
    concept_txt = F.normalize(model.encode_text(concept_tokens).float(), dim=-1)  # (18, D)
    scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
    hot = batch["concepts"]
    losses: dict[str, torch.Tensor] = {}
    l_clip, l_bce = 0.0, 0.0
    for key in ("cls", "mean"):
        img = F.normalize(feats[key].float(), dim=-1)
        l_clip = l_clip + multi_positive_infonce(scale * img @ txt.t(), batch["positives"]) / 2
        logits = head.bce_scale.clamp(max=math.log(100.0)).exp() * img @ concept_txt.t() + head.bce_bias
        l_bce = l_bce + F.binary_cross_entropy_with_logits(logits, hot) / 2
    l_dense = 0.0
    dscale = head.dense_scale.clamp(max=math.log(100.0)).exp()
    k = min(cfg.dense_topk, feats["dense_std"].shape[1])
    for key in ("dense_std", "dense_maskclip", "dense_value"):
        f = F.normalize(feats[key].float(), dim=-1)
        prob = (dscale * f @ concept_txt.t()).softmax(dim=-1)  # (B, hw, 18)
        score = prob.topk(k, dim=1).values.mean(dim=1).clamp(1e-6, 1 - 1e-6)
        # written out: F.binary_cross_entropy refuses to run under CUDA autocast
        bce = -(hot * score.log() + (1 - hot) * (1 - score).log()).mean()
        l_dense = l_dense + bce / 3
    l_attn = attention_affinity_loss(feats["attentions"], feats["dense_std"], cfg.attn_tau) if attn_weight > 0 else 0.0
    losses["clip"] = l_clip
    losses["bce"] = l_bce
    losses["dense"] = l_dense
    losses["attn"] = torch.as_tensor(l_attn, dtype=torch.float32)
    losses["total"] = cfg.w_clip * l_clip + cfg.w_bce * l_bce + cfg.w_dense * l_dense + attn_weight * l_attn
    return losses



# ----------------------------------------------------------------------------------------------------
# training loop


def lr_multiplier(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine from 1 to ``min_lr_ratio`` over ``progress``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = min(max(progress, 0.0), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def train(cfg: TrainConfig, pool: Optional[ScenePool] = None, progress: bool = True) -> tuple[CLIP, list[dict]]:
    """Train a tiny CLIP as configured; writes ``train_log.csv``, checkpoints and ``tiny_clip.safetensors``."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.time()
    if pool is None:
        pool = ScenePool(cfg.pool_size, cfg.image_size, workers=cfg.pool_workers, progress=progress)
    t_pool = time.time() - t_start
    sampler = BatchSampler(pool, cfg, device)
    model = build_model(model_config(cfg), cfg.seed).to(device).train()
    head = LossHead().to(device)
    decay, no_decay = [], []
    for name, p in list(model.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]:
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    prompt_rng = random.Random(cfg.seed + 1)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    log: list[dict] = []
    log_path = out / "train_log.csv"
    fields = ["step", "elapsed_s", "lr", "loss", "clip", "bce", "dense", "attn", "logit_scale", "val_map", "val_map_mean"]
    with open(log_path, "w", newline="") as fh:
        csv.writer(fh).writerow(fields)
    meta = {"trainer": "tag2mask.training.clip_trainer", "train_config": json.dumps(asdict(cfg))}
    t_train = time.time()
    running: dict[str, float] = {}
    n_run = 0
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress)
    step = 0
    for step in bar:
        elapsed = time.time() - t_train
        prog = step / cfg.steps
        if cfg.time_budget_s > 0:
            prog = max(prog, elapsed / cfg.time_budget_s)
            if prog >= 1.0:
                break
        mult = lr_multiplier(prog, step, cfg)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * mult
        batch = sampler.sample()
        concept_tokens = tokenize(concept_prompts(prompt_rng)).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            # the affinity target comes from the model's own dense features: only once they mean something
            attn_weight = cfg.w_attn if prog >= cfg.attn_start else 0.0
            losses = compute_losses(model, head, batch, concept_tokens, cfg, attn_weight)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), cfg.grad_clip)
        opt.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        n_run += 1
        last = step == cfg.steps - 1
        do_eval = cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or last)
        if (step + 1) % cfg.log_every == 0 or last or do_eval:
            row = {
                "step": step + 1, "elapsed_s": round(time.time() - t_train, 1), "lr": cfg.lr * mult,
                "loss": running["total"] / n_run, "clip": running["clip"] / n_run, "bce": running["bce"] / n_run,
                "dense": running["dense"] / n_run, "attn": running["attn"] / n_run, "logit_scale": float(model.logit_scale.detach().exp()),
                "val_map": "", "val_map_mean": "",
            }
            running, n_run = {}, 0
            if do_eval:
                row["val_map"] = zero_shot_map(model, cfg.n_val, device)
                row["val_map_mean"] = zero_shot_map(model, cfg.n_val, device, pooling="mean")
            log.append(row)
            with open(log_path, "a", newline="") as fh:
                csv.writer(fh).writerow([row[f] for f in fields])
            bar.set_postfix(loss=f"{row['loss']:.3f}", mAP=row["val_map"] if row["val_map"] == "" else f"{row['val_map']:.3f}")
        if cfg.save_every > 0 and (step + 1) % cfg.save_every == 0:
            save_half(model, out / "tiny_clip.safetensors", {**meta, "steps_done": str(step + 1)})
    steps_done = step + 1 if step == cfg.steps - 1 else step
    train_s = time.time() - t_train
    model.eval()
    final = {
        "steps_done": steps_done, "pool_s": round(t_pool, 1), "train_s": round(train_s, 1), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    final["val_map"] = zero_shot_map(model, cfg.n_val, device)
    final["val_map_mean"] = zero_shot_map(model, cfg.n_val, device, pooling="mean")
    save_half(model, out / "tiny_clip.safetensors", {**meta, **{k: str(v) for k, v in final.items()}})
    with open(out / "summary.json", "w") as fh:
        json.dump(final, fh, indent=2)
    return model, log


def main(argv: Optional[Sequence[str]] = None) -> int:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m tag2mask.training.clip_trainer", description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--dense-eval", type=int, default=100, help="val images for the dense mIoU diagnostic (0: skip)")
    args = vars(ap.parse_args(argv))
    threads = args.pop("threads")
    no_progress = args.pop("no_progress")
    dense_eval = args.pop("dense_eval")
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(**args)
    model, _ = train(cfg, progress=not no_progress)
    summary_path = Path(cfg.out) / "summary.json"
    summary = json.loads(summary_path.read_text())
    if dense_eval:
        summary["dense_miou"] = dense_miou(model, dense_eval)
        summary_path.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
