"""WeCLIP training loop: online pseudo labels → balanced CE + 0.1 × affinity loss → PolyWarmupAdamW.

Features: seeded and exactly resumable (decoder, optimiser incl. its schedule counter, grad scaler,
Python/NumPy/torch/CUDA RNG states of every rank, iteration), atomic checkpoints every N iterations
(``ckpt_<iter>.pt`` + ``latest.pt``; only the trainable decoder is saved, CLIP is referenced by path
and fingerprint), CSV logs (TensorBoard too when installed), tqdm progress, periodic validation in
eval mode (mIoU), AMP (bf16 / fp16 with a grad scaler), and DDP under ``torchrun`` (gloo on CPU,
nccl on CUDA) with the global batch split across processes.

Bitwise resume on CPU holds because every random draw is either reproducible from the stream
position (data, see :mod:`tag2mask.methods.weclip.data`) or restored from the checkpoint (dropout).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tag2mask.evaluation.miou import ConfusionMatrix
from tag2mask.io.atomic import atomic_path
from tag2mask.methods.weclip.data import PositionSampler, WeCLIPTrainSet, collate_train, open_images
from tag2mask.methods.weclip.losses import affinity_loss, balanced_ce_terms, cams_to_affinity_label, radius_window_mask
from tag2mask.methods.weclip.model import WeCLIP, WeCLIPConfig, build_clip_for, normalize_rgb
from tag2mask.runtime import resolve_device, resolve_dtype, seed_everything
from tag2mask.training.schedule import PolyWarmupAdamW

__all__ = [
    "TrainOptions", "train_weclip", "train_step", "training_loss", "validate", "config_with_overrides",
    "load_training_checkpoint", "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "tag2mask-weclip-v1"
LOG_FIELDS = ("iteration", "loss", "seg_loss", "aff_loss", "lr", "rfm", "sec_per_it")


@dataclass
class TrainOptions:
    """How to run a training job (the model/recipe itself is a :class:`WeCLIPConfig`).

    data / train_split / val_split / labels_file: see :func:`~tag2mask.methods.weclip.data.open_images`
    (``val_split=None`` disables validation). ``resume``: a checkpoint path, ``"auto"`` (``OUT/latest.pt``
    if present) or ``None``. ``stop_at``: leave after this many iterations (the schedule still
    targets ``config.max_iters``; for preemption / time slicing). ``tensorboard``: auto | on | off.
    """

    out_dir: str
    weights: str
    data: str = "synth"
    train_split: str = "train"
    val_split: Optional[str] = "val"
    labels_file: Optional[str] = None
    synth_n: int = 64
    synth_size: int = 160
    val_limit: Optional[int] = None
    ckpt_every: int = 1000
    val_every: int = 2000
    log_every: int = 10
    resume: Optional[str] = None
    stop_at: Optional[int] = None
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 1
    num_workers: int = 0
    tensorboard: str = "auto"
    progress: bool = True
    text_cache_dir: Any = None


# ------------------------------------------------------------------------------------------------
# distributed helpers


def _init_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, initialised_here) from the torchrun environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return rank, world, device, created


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------
# loss


def training_loss(
    seg_logits: torch.Tensor, affinity: torch.Tensor, label: torch.Tensor, config: WeCLIPConfig
) -> dict[str, torch.Tensor]:
    """Balanced CE + ``aff_loss_weight`` × affinity loss (float32).

    seg_logits ``(B, C, h, w)``, affinity ``(B, hw, hw)``, label ``(B, H, W)`` int64.
    Deviation kept explicit: the official balanced CE is NaN when a batch has no background (or no
    foreground) pixel; here the empty term is dropped instead, so one such batch cannot poison training.
    """
    logits = F.interpolate(seg_logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    ce_bg, ce_fg = balanced_ce_terms(logits, label)
    zero = logits.new_zeros(())
    seg = 0.5 * (torch.where(torch.isnan(ce_bg), zero, ce_bg) + torch.where(torch.isnan(ce_fg), zero, ce_fg))
    h, w = label.shape[-2] // 16, label.shape[-1] // 16
    mask = radius_window_mask(h, w, config.aff_radius, device=label.device)
    aff, _, _ = affinity_loss(affinity.float(), cams_to_affinity_label(label, mask=mask))
    return {"loss": seg + config.aff_loss_weight * aff, "seg_loss": seg, "aff_loss": aff}


def train_step(
    model: WeCLIP,
    decoder: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    label_ids: list[list[int]],
    use_rfm: bool,
    amp_dtype: Optional[torch.dtype] = None,
) -> dict[str, torch.Tensor]:
    """One WeCLIP iteration: forward, online pseudo labels (no grad), loss, backward, optimiser step.

    images ``(B, 3, S, S)`` normalised crops on the model's device; ``decoder`` is ``model.decoder``
    or its DDP wrapper. Returns the (detached-able) loss terms.
    """
    ctx = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with ctx:
        out = model(images, decoder=decoder)
    labels = model.online_pseudo_labels(images, label_ids, use_rfm=use_rfm, output=out, autocast_dtype=amp_dtype)
    losses = training_loss(out.seg_logits, out.affinity, labels, model.config)
    opt.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.step(opt)
    scaler.update()
    return losses


# ------------------------------------------------------------------------------------------------
# checkpoints


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train_weclip` (trusted file: it holds RNG states)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a tag2mask WeCLIP checkpoint")
    return ckpt


def _resolve_resume(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    if resume is None:
        return None
    if resume == "auto":
        latest = out_dir / "latest.pt"
        return latest if latest.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume not found: {path}")
    return path


def _save_checkpoint(out_dir: Path, payload: dict[str, Any], iteration: int) -> Path:
    path = out_dir / f"ckpt_{iteration:07d}.pt"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    with atomic_path(out_dir / "latest.pt") as tmp:  # a copy, so latest.pt is never half written
        shutil.copyfile(path, tmp)
    return path


# ------------------------------------------------------------------------------------------------
# logging


class _Logger:
    """CSV (+ optional TensorBoard) logs on rank 0; rows after the resume point are dropped."""

    def __init__(self, out_dir: Path, start_iter: int, tensorboard: str, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.train_csv, self.val_csv = out_dir / "train_log.csv", out_dir / "val_log.csv"
        for path in (self.train_csv, self.val_csv):
            if path.is_file():  # keep only rows up to the checkpoint we resume from
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= start_iter]
                if rows:
                    with open(path, "w", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=list(rows[0]))
                        w.writeheader()
                        w.writerows(rows)
                else:
                    path.unlink()
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_iter + 1)
            except ImportError:
                if tensorboard == "on":
                    raise ImportError("--tensorboard on needs the tensorboard package (pip install tensorboard)")

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def train(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self._append(self.train_csv, row)
            if self.tb is not None:
                for k in ("loss", "seg_loss", "aff_loss", "lr"):
                    self.tb.add_scalar(f"train/{k}", row[k], row["iteration"])

    def val(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self._append(self.val_csv, row)
            if self.tb is not None:
                self.tb.add_scalar("val/miou", row["miou"], row["iteration"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(model: WeCLIP, source: Any, limit: Optional[int], rank: int, world: int,
             autocast_dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """Single-scale mIoU of ``model`` (eval mode) on ``source`` images with GT masks, sharded over ranks."""
    from tag2mask.methods.weclip.inference import multiscale_logits

    was_training = model.training
    model.eval()
    device = next(model.decoder.parameters()).device
    cm = ConfusionMatrix(model.config.num_classes)
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(rank, n, world):
        gt = source.gt(i)
        if gt is None:
            continue
        _, rgb, _ = source.item(i)
        x = normalize_rgb(rgb, model.config.normalization)[None].to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            logits = multiscale_logits(model, x, scales=(1.0,), flip=False)
        pred = F.interpolate(logits.float(), size=gt.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        cm.update(pred.cpu().numpy().astype(np.uint8), gt.astype(np.uint8))
    if world > 1:
        mat = torch.from_numpy(cm.mat)
        dist.all_reduce(mat)
        cm.mat = mat.numpy()
    model.train(was_training)
    s = cm.scores()
    return {"miou": s["Mean IoU"], "pixel_acc": s["Pixel Accuracy"]}


# ------------------------------------------------------------------------------------------------
# the loop


def train_weclip(config: WeCLIPConfig, opts: TrainOptions) -> dict[str, Any]:
    """Train (or resume) a WeCLIP decoder; returns a summary dict (last losses, val scores, paths)."""
    rank, world, device, created = _init_distributed(opts.device)
    out_dir = Path(opts.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    resume_path = _resolve_resume(opts.resume, out_dir)
    ckpt = load_training_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:
        saved = WeCLIPConfig.from_dict(ckpt["config"])
        if saved != config and rank == 0:
            print(f"resume: using the configuration stored in {resume_path}")
        config = saved
    amp_dtype = resolve_dtype(opts.precision)

    seed_everything(opts.seed)  # decoder initialisation is identical on every rank
    clip = build_clip_for(config, opts.weights, device)
    model = WeCLIP(clip, config, text_cache_dir=opts.text_cache_dir).to(device)
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    opt = PolyWarmupAdamW(
        [{"params": params}], lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
        max_iters=config.max_iters, warmup_iters=config.warmup_iters, warmup_ratio=config.warmup_ratio,
        power=config.power,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")
    torch.manual_seed(opts.seed * 1000 + rank)  # dropout streams differ per rank
    start = 0
    if ckpt is not None:
        model.decoder.load_state_dict(ckpt["decoder"])
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iteration"])
        states = ckpt["rng"]
        if len(states) == world:
            _set_rng_state(states[rank])
        elif rank == 0:
            print(f"resume: checkpoint has RNG states of {len(states)} processes, running {world}: not bitwise exact")
    decoder = model.decoder
    if world > 1:
        decoder = torch.nn.parallel.DistributedDataParallel(
            model.decoder, device_ids=[device.index] if device.type == "cuda" else None
        )

    end = config.max_iters if opts.stop_at is None else min(config.max_iters, opts.stop_at)
    source = open_images(opts.data, opts.train_split, config.classes, labels_file=opts.labels_file,
                         synth_n=opts.synth_n, synth_size=opts.synth_size)
    val_source = None
    if opts.val_split and opts.val_every > 0:
        val_source = open_images(opts.data, opts.val_split, config.classes, labels_file=opts.labels_file,
                                 synth_n=opts.synth_n, synth_size=opts.synth_size)
    train_set = WeCLIPTrainSet(source, config.crop_size, scale_range=config.scale_range, hflip=config.hflip,
                               normalization=config.normalization, seed=opts.seed)
    sampler = PositionSampler(start, end, config.batch_size, rank, world)
    loader = torch.utils.data.DataLoader(train_set, batch_size=sampler.local_batch, sampler=sampler,
                                         collate_fn=collate_train, num_workers=opts.num_workers,
                                         # own generator: creating the iterator must not draw from the
                                         # global RNG, or a resumed run's dropout stream would shift
                                         generator=torch.Generator().manual_seed(opts.seed))
    logger = _Logger(out_dir, start, opts.tensorboard, enabled=rank == 0)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(
            {"model": config.to_dict(), "train": {k: v for k, v in asdict(opts).items() if k != "text_cache_dir"}},
            indent=2, default=str))

    meta = {"weights": str(getattr(clip, "source_path", opts.weights)), "fingerprint": getattr(clip, "fingerprint", "")}
    summary: dict[str, Any] = {"start_iteration": start, "iterations": start, "checkpoints": [], "val": []}
    bar = None
    if opts.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=end - start, desc="weclip", dynamic_ncols=True)
    model.train()
    tic = time.perf_counter()
    for it, batch in zip(range(start, end), loader):
        images = batch.images.to(device, non_blocking=True)
        use_rfm = model.use_rfm_at(it)
        losses = train_step(model, decoder, opt, scaler, images, batch.label_ids, use_rfm, amp_dtype)
        done = it + 1

        if done % opts.log_every == 0 or done == end:
            vals = torch.stack([losses[k].detach().float() for k in ("loss", "seg_loss", "aff_loss")])
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            now = time.perf_counter()
            row = {"iteration": done, "loss": float(vals[0]), "seg_loss": float(vals[1]), "aff_loss": float(vals[2]),
                   "lr": opt.param_groups[0]["lr"], "rfm": int(use_rfm),
                   "sec_per_it": (now - tic) / opts.log_every}
            tic = now
            logger.train(row)
            summary["last"] = row
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", rfm=row["rfm"])
        if val_source is not None and done % opts.val_every == 0:
            scores = validate(model, val_source, opts.val_limit, rank, world, amp_dtype)
            logger.val({"iteration": done, **scores})
            summary["val"].append({"iteration": done, **scores})
        if done % opts.ckpt_every == 0 or done == end:
            rng_states = _gather(_rng_state(), world)
            if rank == 0:
                payload = {
                    "format": CHECKPOINT_FORMAT, "iteration": done, "decoder": model.decoder.state_dict(),
                    "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "rng": rng_states, "config": config.to_dict(), "clip": meta, "world_size": world,
                    "train_options": {k: v for k, v in asdict(opts).items() if k != "text_cache_dir"},
                }
                summary["checkpoints"].append(str(_save_checkpoint(out_dir, payload, done)))
            if world > 1:
                dist.barrier()
        summary["iterations"] = done
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    logger.close()
    if created:
        dist.destroy_process_group()
    summary["out_dir"] = str(out_dir)
    return summary


def config_with_overrides(config: WeCLIPConfig, **overrides: Any) -> WeCLIPConfig:
    """``replace`` ignoring ``None`` values (CLI options that were not given)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})

