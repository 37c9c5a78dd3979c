"""Options shared by several sub-commands, so that every command spells them the same way."""

from __future__ import annotations

import argparse

from tag2mask.runtime import DEVICE_CHOICES


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
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


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast precision for the CLIP forward passes (default fp32; bf16 is faster on recent CPUs/GPUs)",
    )


def shipped_weights_path():
    """The tiny CLIP trained on tag2mask's synthetic world, shipped inside the package."""
    from tag2mask.clip.shipped import tiny_clip_path

    return tiny_clip_path()


def load_model_from_args(args: argparse.Namespace, official_rounding: bool = False):
    """Load ``--weights`` (or the shipped tiny CLIP) on ``--device``.

    ``official_rounding`` reproduces the official CLIP-ES/WeCLIP loaders: Conv/Linear weights and
    projections rounded to fp16, interpolated positional embeddings rounded to fp16.
    """
    from tag2mask.clip.loading import WeightsNotFoundError, load_clip
    from tag2mask.runtime import resolve_device

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
    parser.add_argument("--limit", type=int, default=None, help="process at most this many items (for a quick look)")
