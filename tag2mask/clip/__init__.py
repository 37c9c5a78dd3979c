"""The CLIP core: towers in OpenAI's layout, dense hooks, weight loading, tokenizer, text embeddings."""

from tag2mask.clip.loading import REGISTRY, WeightsError, WeightsNotFoundError, load_clip, save_clip
from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from tag2mask.clip.shipped import tiny_clip_path

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "REGISTRY",
    "WeightsError",
    "WeightsNotFoundError",
    "load_clip",
    "save_clip",
    "tiny_clip_path",
]
