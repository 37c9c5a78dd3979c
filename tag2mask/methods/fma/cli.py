"""``tag2mask train fma``: FMA-WSSS prompt learning (classification or segmentation prompts, see DESCRIPTION)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

from tag2mask.cmdline.options import add_device_option, add_weights_options, check_weights_options, reject_options
from tag2mask.cmdline.run_options import add_run_options
from tag2mask.cmdline import option_types as ot

__all__ = ["add_fma_parser", "run_fma"]

DESCRIPTION = """Learn FMA-WSSS's prompt contexts on a frozen CLIP (the contexts are the only trained weights).

  --task cls   classification prompts from image-level labels (multi-label contrastive loss)
  --task seg   segmentation prompts from the coarse seeds of the cls prompts (CAM activation loss)

the official two-stage recipe (VOC; docs/fma.md has COCO and the seeding options):
  tag2mask train fma --task cls --data VOCdevkit/VOC2012 --weights ViT-B-16.pt --out runs/cls --device cuda
  tag2mask label VOCdevkit/VOC2012 --split train_aug --method fma --prompts runs/cls \\
      --proposals sam --sam-weights sam-vit-huge --out coarse
  tag2mask train fma --task seg --data VOCdevkit/VOC2012 --seeds coarse --weights ViT-B-16.pt --out runs/seg
  tag2mask label VOCdevkit/VOC2012 --split train_aug --method fma --prompts runs/seg \\
      --proposals sam --sam-weights sam-vit-huge --out fine          # fine seeds for a segmenter
on the synthetic world with the shipped tiny CLIP (CPU, minutes):
  tag2mask synth export --out world --n 200 --val 50
  tag2mask train fma --task cls --data world --classes synth --out runs/cls --device cpu

The preset (voc, coco, synth; default from the data set) sets the prompts (16 context tokens;
cls: shared, name at the end, named background prompts; seg: VOC class-specific, name in front,
nameless background prompts), the schedule (SGD momentum 0.9, weight decay 5e-4, lr 1e-3 flat at
1e-5 for the warm-up, then cosine), batch 16 (COCO: gradient accumulation), the augmentation
(colour jitter, random rescale, 224 crop, flip) and, for `label`, the CAA and seeding settings.
GPU runs use fp16 autocast with a gradient scaler, as the official code (--precision auto).

The run folder is the training engine's (docs/training.md): checkpoints, --resume, --overwrite,
torchrun, append-only logs (train_log.csv: loss, cl_loss or cam_fg / cam_bg, positives, lr). At the
end OUT/prompts.safetensors holds the learned context and the recipe.
"""

# default training split per data set kind
_SPLITS = {"synth": "train", "voc": "train_aug", "coco": "train", "folder": "train"}


def add_parser(methods: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    f = methods.add_parser("fma", help="FMA-WSSS: learn prompt contexts (classification or segmentation prompts)",
                           description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--task", required=True, choices=("cls", "seg"),
                   help="cls: prompts from image-level labels; seg: prompts from the seeds of the cls prompts")
    f.add_argument("--data", required=True,
                   help="'synth' (synthetic world), a VOC root, a COCO root in the WSSS layout (<split>.txt with "
                        "class ids) or an image folder (with --labels)")
    f.add_argument("--seeds", default=None,
                   help="--task seg: the coarse seeds, a `tag2mask label --method fma` run folder or a folder of "
                        "<name>.png (0 background, class id + 1, 255 ignore)")
    f.add_argument("--preset", choices=("voc", "coco", "synth"), default=None,
                   help="recipe preset (default: synth for 'synth' and synth exports, coco for COCO roots, else voc)")
    f.add_argument("--classes", default=None,
                   help="voc, coco, synth, a name-set file or 'a, b; background: c, d' (default: the preset's); "
                        "label ids index these classes, synonyms of a class form one prompt")
    f.add_argument("--labels", default=None, help="JSON/CSV image-level labels of an image folder")
    f.add_argument("--split", default=None, help="training split (default: VOC train_aug, COCO train, synth and synth exports train)")
    f.add_argument("--label-source", choices=("gt_mask", "dataset"), default=None,
                   help="image-level labels from the ground-truth masks (the official seg_cls_labels; default for "
                        "voc/coco) or from the annotations / label file (default for synth and folders)")
    f.add_argument("--iters", type=ot.positive_int(ot.MAX_ITERS), default=None, help="iterations (VOC cls 1800, seg 17000; COCO 20500, 75000)")
    f.add_argument("--warmup-iters", type=ot.non_negative_int(ot.MAX_ITERS), default=None, help="flat warm-up iterations (VOC 500, COCO 1000)")
    f.add_argument("--batch-size", type=ot.positive_int(ot.MAX_BATCH), default=None, help="images per optimiser step, split over processes (16)")
    f.add_argument("--grad-accumulation", type=ot.positive_int(1024), default=None,
                   help="sub-batches per step (official COCO: 4 cls, 8 seg; default: the preset's)")
    f.add_argument("--lr", type=ot.finite_float(0, 10, lo_open=True), default=None, help="base learning rate after the warm-up (1e-3)")
    f.add_argument("--ctx-seed", default=None, help="seed of the initial context, an integer or a string hashed "
                                                    "with sha1 as the official toolkit ('真' cls, '机' seg)")
    add_run_options(f, out_help="run folder: checkpoints, config.json, train_log.csv, prompts.safetensors",
                    ckpt_every=500, log_every=10, seed=0, seed_help="random seed of the data stream (official: 0)")
    f.add_argument("--synth-n", type=ot.positive_int(1_000_000), default=200, help="--data synth: number of training scenes")
    f.add_argument("--synth-size", type=ot.int_in(16, ot.MAX_SIDE), default=224, help="--data synth: scene size in pixels")
    f.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision (default auto: fp16 with a gradient scaler on CUDA, as the official "
                        "training; fp32 on CPU)")
    add_weights_options(f)
    add_device_option(f)
    f.set_defaults(func=run_fma)
    from tag2mask.cmdline.options import record_given_options

    record_given_options(f)
    return f


def _default_split(data: str, kind: str) -> str:
    """VOC train_aug, COCO train; a tag2mask synth export (VOC layout without train_aug) train."""
    from tag2mask.synth.export import export_splits

    export = export_splits(data) if kind == "voc" else None
    return export[0] if export else _SPLITS[kind]


def _preset_for(args: argparse.Namespace, kind: str) -> str:
    if args.preset:
        return args.preset
    if args.data == "synth":
        return "synth"
    from tag2mask.synth.export import is_synthetic_export

    if is_synthetic_export(args.data):
        return "synth"
    return "coco" if kind == "coco" else "voc"


def build_fma_config(args: argparse.Namespace, kind: str):
    """The :class:`FMATrainConfig` of the command line (preset + overrides)."""
    from tag2mask.methods.fma.prompts import seed_from_string
    from tag2mask.methods.fma.prompt_run import FMATrainConfig
    from tag2mask.vocab.vocabulary import load_vocabulary

    name = _preset_for(args, kind)
    vocab = load_vocabulary(args.classes or name)
    if not vocab.background:
        raise ValueError(f"--classes {args.classes}: FMA-WSSS needs background words ('...; background: sky, grass')")
    seed: Any = None
    if args.ctx_seed is not None:
        seed = int(args.ctx_seed) if args.ctx_seed.lstrip("-").isdigit() else args.ctx_seed
        seed_from_string(seed)  # type check
    overrides: dict[str, Any] = dict(max_iters=args.iters, warmup_iters=args.warmup_iters, batch_size=args.batch_size,
                                     grad_accumulation=args.grad_accumulation, base_lr=args.lr,
                                     label_source=args.label_source)
    if kind in ("folder",) and args.label_source is None:
        overrides["label_source"] = "dataset"  # a folder's labels are its label file
    if args.data == "synth":
        overrides["label_source"] = "dataset"
    config = FMATrainConfig.build(name, args.task, vocab.names, [",".join(s) for s in vocab.synonyms],
                                  vocab.background, **overrides)
    if seed is not None:
        from dataclasses import replace

        config.stage = replace(config.stage, prompts=replace(config.stage.prompts, seed=seed))
    return config


def check_fma_options(args: argparse.Namespace, kind: str) -> None:
    check_weights_options(args)
    if args.task == "cls":
        reject_options(args, ("seeds",), "to --task cls (it learns from image-level labels)")
    elif args.seeds is None:
        raise ValueError("--task seg needs --seeds: the coarse seeds of the cls prompts "
                         "(tag2mask label --method fma --prompts CLS_RUN ... --out SEEDS)")
    if kind != "folder":
        reject_options(args, ("labels",), f"to a {kind} data set (its labels are read from the data set)")
    if args.data != "synth":
        reject_options(args, ("synth_n", "synth_size"), "without --data synth")
    if kind in ("folder",) or args.data == "synth":
        reject_options(args, ("split",), "to an image folder or --data synth")


def run_fma(args: argparse.Namespace) -> int:
    from tag2mask.cmdline.options import shipped_weights_path
    from tag2mask.cmdline.run_options import run_options_from_args
    from tag2mask.data.datasets import detect_dataset
    from tag2mask.runtime import resolve_device
    from tag2mask.methods.fma.train_task import FMAData, train_fma

    kind = "synth" if args.data == "synth" else detect_dataset(args.data)
    if kind is None:
        raise FileNotFoundError(f"--data {args.data}: not 'synth', a VOC/COCO root or an image folder")
    check_fma_options(args, kind)
    config = build_fma_config(args, kind)
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if resolve_device(args.device).type == "cuda" else "fp32"
    if args.allow_download:
        os.environ["TAG2MASK_ALLOW_DOWNLOAD"] = "1"
    data = FMAData(spec=args.data, split=args.split or _default_split(args.data, kind), seeds=args.seeds, labels_file=args.labels,
                   synth_n=args.synth_n, synth_size=args.synth_size,
                   weights=str(args.weights or shipped_weights_path()))
    options = run_options_from_args(args, precision=precision)
    summary = train_fma(config, data, options)
    if os.environ.get("RANK", "0") == "0":
        last: Optional[dict] = summary.get("last")
        print(json.dumps({"iterations": summary["iterations"], "loss": (last or {}).get("loss"),
                          "checkpoint": summary["checkpoints"][-1] if summary["checkpoints"] else None,
                          "prompts": summary.get("prompts")}))
    return 0
