"""Test helper: TorchScript archives shaped like OpenAI's CLIP checkpoints, built from a state dict."""

from __future__ import annotations

import torch
from torch import nn


def scripted_archive(sd: dict[str, torch.Tensor], extra_attribute: bool = False) -> torch.jit.ScriptModule:
    """A scripted module tree whose ``state_dict()`` has exactly the keys of ``sd`` plus OpenAI's bookkeeping.

    ``extra_attribute``: also store a plain tensor attribute (like an attention mask), which is in the
    archive's pickle but not in ``state_dict()``.
    """
    root = nn.Module()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        if value.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            mod.register_buffer(leaf, value.clone())
    # OpenAI's archives carry these as tensors in state_dict(); build_model deletes them
    root.register_buffer("input_resolution", torch.tensor(224))
    root.register_buffer("context_length", torch.tensor(77))
    root.register_buffer("vocab_size", torch.tensor(49408))
    if extra_attribute:
        root.transformer.resblocks.attn_mask = torch.full((3, 3), float("-inf")).triu(1)
    return torch.jit.script(root)
