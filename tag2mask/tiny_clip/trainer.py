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
variants each (:mod:`tag2mask.tiny_clip.data`); augmentation is random flips and 90-degree
rotations (captions have no spatial words). The loop is the training engine's
(:mod:`tag2mask.engine.loop`): checkpoints with exact resume (``--resume``), a run folder that is
never silently overwritten (``--overwrite``), append-only logs, DDP under torchrun.

CLI::

    python -m tag2mask.tiny_clip.trainer --out runs/tiny --steps 6000 --batch-size 256 --device auto
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tag2mask.clip.loading import save_clip
from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.clip.tokenizer import tokenize
from tag2mask.io.atomic import atomic_write_text
from tag2mask.runtime import resolve_device
from tag2mask.tiny_clip.config import TrainConfig
from tag2mask.tiny_clip.data import BatchSampler, ScenePool, concept_prompts
from tag2mask.tiny_clip.evaluation import dense_miou, image_features, zero_shot_map
from tag2mask.engine.loop import RunOptions, TrainContext, TrainTask
from tag2mask.engine.loop import train as engine_train
from tag2mask.engine.logs import read_log

__all__ = ["TinyClipTask", "build_model", "train", "save_half", "main"]

# ----------------------------------------------------------------------------------------------------
# configuration and model


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
# training on the engine


def lr_multiplier(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine from 1 to ``min_lr_ratio`` over ``progress``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = min(max(progress, 0.0), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


#: TrainConfig fields that say how to run, not what to train (a resume may change them)
_RUN_FIELDS = ("out", "device", "seed", "log_every", "eval_every", "n_val", "save_every", "pool_workers")


class _Losses(nn.Module):
    """CLIP + loss head behind one ``forward``, so DDP averages their gradients."""

    def __init__(self, model: CLIP, head: LossHead, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.head, self.cfg = model, head, cfg

    def forward(self, batch: dict[str, torch.Tensor], concept_tokens: torch.Tensor, attn_weight: float):
        return compute_losses(self.model, self.head, batch, concept_tokens, self.cfg, attn_weight)


class TinyClipTask(TrainTask):
    """The tiny CLIP's contrastive + BCE + dense (+ attention) training (see the module docstring).

    Batches are position based (image draws, augmentation and prompts seeded by the iteration), so a
    resumed run repeats the uninterrupted one; with ``time_budget_s`` the schedule also advances
    with the elapsed time (carried over a resume) and the run stops when it is spent.
    """

    name = "tiny_clip"
    find_unused_parameters = True

    def __init__(self, cfg: TrainConfig, pool: Optional[ScenePool] = None, progress: bool = True) -> None:
        self.cfg, self.pool, self.progress = cfg, pool, progress
        self.max_grad_norm = cfg.grad_clip if cfg.grad_clip > 0 else None
        self.elapsed_before = 0.0
        self._progress_value = 0.0

    @property
    def max_iters(self) -> int:
        return self.cfg.steps

    def config_dict(self) -> dict:
        return {k: v for k, v in asdict(self.cfg).items() if k not in _RUN_FIELDS}

    def setup(self, ctx: TrainContext) -> None:
        self.ctx, cfg = ctx, self.cfg
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        tic = time.time()
        if self.pool is None:
            self.pool = ScenePool(cfg.pool_size, cfg.image_size, workers=cfg.pool_workers,
                                  progress=self.progress and ctx.is_main)
        self.pool_s = time.time() - tic
        self.sampler = BatchSampler(self.pool, cfg, ctx.device)
        self.model = build_model(model_config(cfg), cfg.seed).to(ctx.device).train()
        self.head = LossHead().to(ctx.device)
        self.losses = ctx.ddp(_Losses(self.model, self.head, cfg))
        self.t_start = time.time()

    def modules(self) -> dict[str, nn.Module]:
        return {"clip": self.model, "head": self.head}

    def build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        named = list(self.model.named_parameters()) + [("head." + n, p) for n, p in self.head.named_parameters()]
        for name, p in named:
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr, betas=(0.9, 0.98), eps=1e-6,
        )

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def _schedule_progress(self, iteration: int) -> float:
        prog = iteration / self.cfg.steps
        if self.cfg.time_budget_s > 0:
            prog = max(prog, self.elapsed() / self.cfg.time_budget_s)
        return prog

    def should_stop(self, iteration: int) -> bool:
        self._progress_value = self._schedule_progress(iteration)
        return self.cfg.time_budget_s > 0 and self._progress_value >= 1.0

    def lr_multiplier(self, iteration: int) -> float:
        self._progress_value = self._schedule_progress(iteration)
        return lr_multiplier(self._progress_value, iteration, self.cfg)

    def batches(self, start: int, end: int):
        ctx, b = self.ctx, self.cfg.batch_size
        if b % ctx.world_size:
            raise ValueError(f"--batch-size {b} is not divisible by the {ctx.world_size} processes")
        local = b // ctx.world_size
        lo, hi = ctx.rank * local, (ctx.rank + 1) * local
        for it in range(start, end):
            batch = self.sampler.sample(it)
            if ctx.world_size > 1:  # this rank's slice of the global batch
                batch = {"images": batch["images"][lo:hi], "tokens": batch["tokens"][lo:hi],
                         "positives": batch["positives"][lo:hi, lo:hi], "concepts": batch["concepts"][lo:hi]}
            prompts = concept_prompts(random.Random(self.cfg.seed * 7919 + it))
            yield batch, tokenize(prompts).to(ctx.device)

    def step(self, batch, iteration: int) -> dict:
        cfg = self.cfg
        if cfg.save_every > 0 and iteration > 0 and iteration % cfg.save_every == 0 and self.ctx.is_main:
            save_half(self.model, Path(cfg.out) / "tiny_clip.safetensors", {**self._meta(), "steps_done": str(iteration)})
        data, concept_tokens = batch
        # the affinity target comes from the model's own dense features: only once they mean something
        attn_weight = cfg.w_attn if self._progress_value >= cfg.attn_start else 0.0
        with self.ctx.autocast():
            losses = self.losses(data, concept_tokens, attn_weight)
        return {"loss": losses["total"], "clip": losses["clip"], "bce": losses["bce"], "dense": losses["dense"],
                "attn": losses["attn"], "logit_scale": self.model.logit_scale.detach().exp()}

    def validate(self, iteration: int) -> Optional[dict]:
        if not self.ctx.is_main:
            return {}
        return {"val_map": zero_shot_map(self.model, self.cfg.n_val, self.ctx.device),
                "val_map_mean": zero_shot_map(self.model, self.cfg.n_val, self.ctx.device, pooling="mean")}

    def extra_state(self) -> dict:
        return {"elapsed_s": torch.tensor(self.elapsed(), dtype=torch.float64)}

    def load_extra_state(self, state: dict) -> None:
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.t_start = time.time()

    def _meta(self) -> dict[str, str]:
        return {"trainer": "tag2mask.tiny_clip.trainer", "train_config": json.dumps(asdict(self.cfg))}

    def finish(self, summary: dict) -> None:
        if not self.ctx.is_main:
            return
        self.model.eval()
        device = self.ctx.device
        final = {
            "steps_done": summary["iterations"], "pool_s": round(self.pool_s, 1), "train_s": round(self.elapsed(), 1),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        final["val_map"] = zero_shot_map(self.model, self.cfg.n_val, device)
        final["val_map_mean"] = zero_shot_map(self.model, self.cfg.n_val, device, pooling="mean")
        out = Path(self.cfg.out)
        save_half(self.model, out / "tiny_clip.safetensors", {**self._meta(), **{k: str(v) for k, v in final.items()}})
        atomic_write_text(out / "summary.json", json.dumps(final, indent=2))


def train(cfg: TrainConfig, pool: Optional[ScenePool] = None, progress: bool = True, resume: Optional[str] = None,
          overwrite: bool = False) -> tuple[CLIP, list[dict]]:
    """Train a tiny CLIP on the engine; writes the engine's logs and checkpoints, ``tiny_clip.safetensors``
    and ``summary.json`` in ``cfg.out``. Returns the model and the training log rows."""
    device = resolve_device(cfg.device)
    task = TinyClipTask(cfg, pool, progress)
    options = RunOptions(
        out_dir=cfg.out, resume=resume, overwrite=overwrite, device=cfg.device, seed=cfg.seed,
        precision="bf16" if cfg.bf16 and device.type == "cuda" else "fp32",
        ckpt_every=cfg.save_every if cfg.save_every > 0 else cfg.steps, keep_last=2,
        val_every=cfg.eval_every, log_every=cfg.log_every, progress=progress,
        resume_command="python -m tag2mask.tiny_clip.trainer ... --resume",
    )
    engine_train(task, options)
    return task.model, read_log(Path(cfg.out) / "train_log.csv")


def main(argv: Optional[Sequence[str]] = None) -> int:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m tag2mask.tiny_clip.trainer", description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--resume", action="store_const", const="auto", default=None,
                    help="continue the run in --out from its newest complete checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    ap.add_argument("--dense-eval", type=int, default=100, help="val images for the dense mIoU diagnostic (0: skip)")
    args = vars(ap.parse_args(argv))
    threads = args.pop("threads")
    no_progress = args.pop("no_progress")
    resume, overwrite = args.pop("resume"), args.pop("overwrite")
    dense_eval = args.pop("dense_eval")
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(**args)
    model, _ = train(cfg, progress=not no_progress, resume=resume, overwrite=overwrite)
    summary_path = Path(cfg.out) / "summary.json"
    summary = json.loads(summary_path.read_text())
    if dense_eval:
        summary["dense_miou"] = dense_miou(model, dense_eval)
        summary_path.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
