"""Options shared by several sub-commands, so that every command spells them the same way."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Iterable, Optional

from tag2mask.runtime import DEVICE_CHOICES
from tag2mask.cmdline import option_types as ot


def plain_text(doc: str) -> str:
    """A docstring as plain ``--help`` text: no reST literals (````x````), roles (``:func:`x```) or ``::``."""
    import re

    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    text = text.replace("``", "")
    return re.sub(r"::(\s*)$", r":\1", text, flags=re.M)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        type=ot.device,
        help=f"where to run: {'|'.join(DEVICE_CHOICES)} or cuda:N (default: auto = CUDA when available)",
    )


def add_weights_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--weights",
        required=required,
        default=None,
        help="CLIP weights: an OpenAI .pt (TorchScript or state dict), a .safetensors file, a Hugging Face "
        "CLIPModel folder, or a name (ViT-B/16, RN50 ...) found in ~/.cache/clip. "
        "Default: the tiny CLIP shipped with tag2mask (trained on its synthetic world).",
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="allow downloading a named checkpoint from OpenAI if it is not cached (off by default)",
    )


def check_weights_options(args: argparse.Namespace) -> None:
    """``--allow-download`` needs ``--weights`` (the shipped tiny CLIP is never downloaded)."""
    if getattr(args, "weights", None) is None:
        reject_options(args, ("allow_download",), "without --weights (the shipped tiny CLIP is never downloaded)")


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast precision for the CLIP forward passes (default fp32; bf16 is faster on recent CPUs/GPUs)",
    )


def shipped_weights_path():
    """The tiny CLIP trained on tag2mask's synthetic world, shipped inside the package."""
    from tag2mask.clip.shipped import SHIPPED_WEIGHTS

    return SHIPPED_WEIGHTS


def toy_model_warning(model, inputs: Iterable["str | os.PathLike"]) -> Optional[str]:
    """Warn (once, on the main process) when the shipped tiny CLIP runs on non-synthetic inputs.

    ``inputs`` are the paths the command was given; the note is skipped when all of them lie in a
    ``tag2mask synth export`` folder. Returns the note for ``run.json`` / pages, or ``None``.
    """
    from tag2mask.clip.shipped import TINY_CLIP_NOTE, is_shipped_tiny_clip
    from tag2mask.jobs.distributed import dist_info
    from tag2mask.synth.export import is_synthetic_export

    inputs = list(inputs)
    if not is_shipped_tiny_clip(model) or (inputs and all(is_synthetic_export(p) for p in inputs)):
        return None
    if dist_info().is_main:
        print(f"warning: {TINY_CLIP_NOTE}", file=sys.stderr)
    return TINY_CLIP_NOTE


def load_model_from_args(args: argparse.Namespace, official_rounding: bool = False):
    """Load ``--weights`` (or the shipped tiny CLIP) on ``--device``.

    ``official_rounding`` reproduces the official CLIP-ES/WeCLIP loaders: Conv/Linear weights and
    projections rounded to fp16, interpolated positional embeddings rounded to fp16.
    """
    from tag2mask.clip.loading import WeightsNotFoundError, load_clip
    from tag2mask.runtime import resolve_device

    check_weights_options(args)
    weights = args.weights
    if weights is None:
        weights = shipped_weights_path()
        if not weights.exists():
            raise WeightsNotFoundError(
                f"no --weights given and the shipped tiny CLIP is missing ({weights}); pass --weights"
            )
    model = load_clip(
        weights,
        device=resolve_device(args.device),
        round_fp16_weights=official_rounding,
        allow_download=True if getattr(args, "allow_download", False) else None,
    )
    if official_rounding and model.is_vit:
        model.visual.round_pos_embed_fp16 = True
    return model


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options every batch job shares: resume, overwrite, verbosity."""
    parser.add_argument("--resume", action="store_true", help="skip items already finished in OUT (outputs verified)")
    parser.add_argument("--overwrite", action="store_true", help="allow re-running into OUT with different settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="print one line per item (the JSON log in OUT/logs/ always has them)")
    parser.add_argument("--limit", type=ot.positive_int(ot.MAX_COUNT), default=None, help="process at most this many items (for a quick look)")


def add_overlap_options(parser: argparse.ArgumentParser, cpu_work: str) -> None:
    """``--workers`` and ``--batch-size`` of a command that runs its items through overlapped stages."""
    from tag2mask.jobs.overlap import MIN_CPUS_FOR_CPU_MODEL, default_workers

    parser.add_argument(
        "--workers", type=ot.auto_or(ot.non_negative_int(ot.MAX_WORKERS, note="0: in this process")), default="auto",
        help=f"CPU worker processes that {cpu_work} while this process runs the model, so that neither waits "
        f"for the other; 0 = one item after the other in this process (default: auto = the usable CPUs, shared "
        f"by the torchrun ranks of a node, minus one, at most 16: {default_workers('cuda')} here with a GPU, "
        f"{default_workers('cpu')} with the model on the CPU, where fewer than {MIN_CPUS_FOR_CPU_MODEL} CPUs give 0)",
    )
    parser.add_argument(
        "--batch-size", type=ot.auto_or(ot.positive_int(ot.MAX_BATCH)), default="auto",
        help="images per model pass with --workers > 0 (default: auto = 1 on a CPU, where batching does not pay "
        "and keeps the outputs bit for bit those of --workers 0; 8 on a GPU, where the outputs then differ in the "
        "last float bits of the CAMs)",
    )


def check_overlap_options(args: argparse.Namespace) -> None:
    """``--batch-size`` needs worker processes (the serial path runs one item at a time)."""
    if args.workers == 0:
        reject_options(args, ("batch_size",), "with --workers 0 (items run one at a time in this process)")


def add_engine_options(parser: argparse.ArgumentParser, workers: bool = False) -> None:
    """``--engine`` (local processes or Ray Data actors) and the Ray engine's own options; ``workers``: also
    ``--workers`` (the Ray actors), for a command without local worker processes."""
    g = parser.add_argument_group("engine (docs/batch_jobs.md: torchrun vs Ray)")
    if workers:
        g.add_argument("--workers", type=ot.auto_or(ot.positive_int(ot.MAX_WORKERS)), default="auto",
                       help="with --engine ray: Ray actors, each with its own model (default: auto)")
    g.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: this process (and its --workers, or torchrun ranks); ray: Ray Data actors, each "
                   "keeping its own model loaded, on this machine or a Ray cluster (--address; extra 'ray'). "
                   "With ray, --workers is the number of actors (auto: one per GPU share with --num-gpus-per-worker, "
                   "else the CPUs / 2) and each gets CPUs / actors threads (default: local)")
    g.add_argument("--address", default=None,
                   help="with --engine ray: the Ray cluster to join (e.g. HEAD:6379, or 'auto'); default: start one here")
    g.add_argument("--num-gpus-per-worker", type=ot.finite_float(0, 64), default=0.0,
                   help="with --engine ray: GPUs each actor reserves (a fraction shares a GPU; default 0)")


def check_engine_options(args: argparse.Namespace) -> None:
    """Ray's options need ``--engine ray``; the Ray engine has no local batches and is not run under torchrun."""
    if args.engine != "ray":
        ray_only = ("address", "num_gpus_per_worker") + (() if hasattr(args, "batch_size") else ("workers",))
        reject_options(args, ray_only, "with --engine local (they configure the Ray engine)")
        return
    reject_options(args, ("batch_size",), "with --engine ray (each actor runs one image at a time)")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--engine ray does not run under torchrun: Ray starts its own workers (use one or the other)")
    if args.workers == 0:
        raise ValueError("--workers 0 does not apply with --engine ray (it is the number of Ray actors, at least 1)")


def ray_engine_from_args(args: argparse.Namespace, builder: str, input_path, build_args: Any = None) -> "object":
    """The :class:`~tag2mask.jobs.ray_engine.RayEngine` of checked ``args``: ``builder(build_args)`` runs in each
    actor (default ``build_args``: ``args``; it must pickle: plain data, module-level functions)."""
    from tag2mask.jobs.ray_engine import RayEngine, import_ray

    import_ray()  # a missing extra is one line at start-up, before the model loads
    return RayEngine(builder, args if build_args is None else build_args, input_path, address=args.address,
                     workers=None if args.workers == "auto" else int(args.workers),
                     num_gpus_per_worker=float(args.num_gpus_per_worker))


def overlap_settings(args: argparse.Namespace, device) -> tuple[int, int]:
    """``(workers, batch_size)`` that run, with ``auto`` resolved for this machine and ``device``."""
    from tag2mask.jobs.overlap import default_workers

    device_type = getattr(device, "type", str(device).split(":")[0])
    workers = default_workers(device_type) if args.workers == "auto" else int(args.workers)
    if workers == 0:
        return 0, 1
    batch = (1 if device_type == "cpu" else 8) if args.batch_size == "auto" else int(args.batch_size)
    return workers, batch


# --- options that do not apply -------------------------------------------------------------------
# argparse does not say which options were typed and which hold their default, but "an option that
# does not apply is an error" needs exactly that (``--method naclip`` with ``--checkpoint`` is a
# mistake even though naclip is the default). ``record_given_options`` makes every option action
# of a parser also note what was typed in ``args.given_options``: ``(dest, option string)`` pairs.


@functools.lru_cache(maxsize=None)
def _recording(action_class: type) -> type:
    class Recording(action_class):  # type: ignore[misc, valid-type]
        def __call__(self, parser, namespace, values, option_string=None):
            typed = tuple(getattr(namespace, "given_options", ())) + ((self.dest, option_string),)
            setattr(namespace, "given_options", typed)
            super().__call__(parser, namespace, values, option_string)

    Recording.__name__ = f"Recording{action_class.__name__}"
    return Recording


def record_given_options(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` record the options the user typed in ``args.given_options``; call it last."""
    parser.set_defaults(given_options=())
    for action in parser._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            action.__class__ = _recording(type(action))


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether option ``dest`` was typed (needs :func:`record_given_options` on the parser)."""
    return any(d == dest for d, _ in getattr(args, "given_options", ()))


def reject_options(args: argparse.Namespace, dests: Iterable[str], reason: str) -> None:
    """Raise ``ValueError`` naming every typed option of ``dests``: they do not apply because ``reason``."""
    dests = set(dests)
    typed = list(dict.fromkeys(opt for d, opt in getattr(args, "given_options", ()) if d in dests))
    if typed:
        verb = "does" if len(typed) == 1 else "do"
        raise ValueError(f"{', '.join(typed)} {verb} not apply {reason}")
