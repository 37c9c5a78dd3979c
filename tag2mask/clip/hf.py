"""Hugging Face ``CLIPModel`` weights -> tag2mask's OpenAI layout (no ``transformers`` import needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from tag2mask.clip.model import CLIPConfig, TextConfig, VisionConfig
from tag2mask.io.torch_files import safe_torch_load

_LAYER = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)$")

_BLOCK_PARTS = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}

_SINGLE = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}

_IGNORED = ("position_ids",)


def is_hf_state_dict(sd: dict[str, Any]) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF keys to OpenAI's and fuse q/k/v into ``in_proj``; projections are transposed.

    Raises ``KeyError`` listing keys it does not understand rather than silently dropping them.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key.endswith(_IGNORED):
            continue
        if key in _SINGLE:
            out[_SINGLE[key]] = value
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        m = _LAYER.match(key)
        if not m:
            unknown.append(key)
            continue
        tower, idx, rest = m.groups()
        prefix = ("visual.transformer.resblocks." if tower == "vision" else "transformer.resblocks.") + idx + "."
        pm = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if pm:
            qkv.setdefault((prefix, pm.group(2)), {})[pm.group(1)] = value
        elif rest in _BLOCK_PARTS:
            out[prefix + _BLOCK_PARTS[rest]] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"unrecognised Hugging Face CLIP keys: {sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"incomplete q/k/v projections under {prefix}: have {sorted(parts)}")
        out[prefix + f"attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# transformers' CLIPVisionConfig / CLIPTextConfig defaults: config.json files may omit keys left at
# these values, and older hub files keep (some of) them under ``*_config_dict`` instead.
_HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224,
    "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_HF_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


def _sub_config(config_json: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """defaults < ``<name>_config`` < ``<name>_config_dict`` (the precedence transformers applies)."""
    merged = dict(defaults)
    merged.update(config_json.get(f"{name}_config") or {})
    merged.update(config_json.get(f"{name}_config_dict") or {})
    return merged


def config_from_hf(config_json: dict[str, Any]) -> CLIPConfig:
    """Build a :class:`CLIPConfig` from a HF ``config.json`` of a ``CLIPModel`` (head counts taken as given)."""
    v = _sub_config(config_json, "vision", _HF_VISION_DEFAULTS)
    t = _sub_config(config_json, "text", _HF_TEXT_DEFAULTS)
    act = v["hidden_act"]
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported activation {act!r} in the Hugging Face config")
    if t["hidden_act"] != act:
        raise ValueError(f"different activations in the towers ({act!r} vs {t['hidden_act']!r}) are not supported")
    return CLIPConfig(
        embed_dim=config_json.get("projection_dim", 512),
        vision=VisionConfig(
            width=v["hidden_size"],
            layers=v["num_hidden_layers"],
            heads=v["num_attention_heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
        ),
        text=TextConfig(
            width=t["hidden_size"],
            layers=t["num_hidden_layers"],
            heads=t["num_attention_heads"],
            context_length=t["max_position_embeddings"],
            vocab_size=t["vocab_size"],
        ),
        activation=act,
        ln_eps=v["layer_norm_eps"],
    )


def read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], Optional[CLIPConfig]]:
    """Read a ``save_pretrained`` folder: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``."""
    cfg = None
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        from tag2mask.io.json_files import read_json

        cfg = config_from_hf(read_json(cfg_path))
    st = sorted(folder.glob("*.safetensors"))
    if st:
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for p in st:
            sd.update(load_file(str(p)))
        return sd, cfg
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        sd = {}
        for p in bins:
            sd.update(safe_torch_load(p, "Hugging Face weight file"))
        return sd, cfg
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin in this Hugging Face folder")
