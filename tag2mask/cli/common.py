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
