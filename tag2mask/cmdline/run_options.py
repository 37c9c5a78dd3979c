"""The run-folder options every ``tag2mask train`` sub-command shares, and their :class:`RunOptions`.

One place, so ``train weclip|segmenter|clip-zss|fma`` resume, overwrite, stop and log alike
(docs/training.md); each sub-command only chooses its defaults.
"""

from __future__ import annotations

import argparse
from tag2mask.cmdline import option_types as ot
import os
import shlex
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from tag2mask.engine.loop import RunOptions

__all__ = ["add_run_options", "run_options_from_args", "resume_command"]


def add_run_options(parser: argparse.ArgumentParser, *, out_help: str = "run folder", ckpt_every: int,
                    log_every: int, seed: int, seed_help: str = "random seed", tensorboard: str = "off") -> None:
    """Add --out, --ckpt-every, --log-every, --keep-last, --resume, --overwrite, --stop-at, --seed,
    --workers, --tensorboard and --quiet with this sub-command's defaults."""
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--ckpt-every", type=ot.positive_int(ot.MAX_ITERS), default=ckpt_every, help="checkpoint every N iterations")
    parser.add_argument("--log-every", type=ot.positive_int(ot.MAX_ITERS), default=log_every, help="log mean losses every N iterations")
    parser.add_argument("--keep-last", type=ot.positive_int(ot.MAX_ITERS), default=None, help="keep only the newest N checkpoints (default: all)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue the run in OUT from its newest complete checkpoint (or from the given "
                             "checkpoint file / run folder); the recipe stored in the checkpoint is used")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an existing OUT (deletes its checkpoints and logs)")
    parser.add_argument("--stop-at", type=ot.positive_int(ot.MAX_ITERS), default=None,
                        help="leave after this iteration (the schedule still targets --iters)")
    parser.add_argument("--seed", type=ot.non_negative_int(2**32 - 1), default=seed, help=seed_help)
    parser.add_argument("--workers", type=ot.non_negative_int(ot.MAX_WORKERS, note="0: in this process"), default=0, help="data loader worker processes")
    tb_help = "TensorBoard logs (auto: if installed)" if tensorboard == "auto" else "TensorBoard logs"
    parser.add_argument("--tensorboard", choices=("auto", "on", "off"), default=tensorboard, help=tb_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_options_from_args(args: argparse.Namespace, *, val_every: int = 0,
                          precision: Optional[str] = None) -> "RunOptions":
    """The engine's :class:`RunOptions` from the options of :func:`add_run_options` (+ device, precision)."""
    from tag2mask.engine.loop import RunOptions

    return RunOptions(
        out_dir=args.out, resume=args.resume, overwrite=args.overwrite, device=args.device,
        precision=precision or args.precision, seed=args.seed, stop_at=args.stop_at, ckpt_every=args.ckpt_every,
        val_every=val_every, log_every=args.log_every, keep_last=args.keep_last, num_workers=args.workers,
        progress=not args.quiet, tensorboard=args.tensorboard, resume_command=resume_command(),
    )


def resume_command() -> str:
    """This command line with ``--resume`` instead of ``--resume [X]`` / ``--overwrite`` (for messages)."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            if not a.startswith("-"):
                continue
        if a == "--resume":
            skip = True
            continue
        if a == "--overwrite" or a.startswith("--resume="):
            continue
        argv.append(a)
    if "train" not in argv or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return ""  # the engine then says: rerun the same command with --resume
    return " ".join(["tag2mask", *map(shlex.quote, argv[argv.index("train"):]), "--resume"])
