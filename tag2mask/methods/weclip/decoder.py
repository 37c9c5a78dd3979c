"""WeCLIP's decoder now lives in :mod:`tag2mask.models.weclip_decoder` (shared with the segmenter
networks, which use it over any frozen CLIP); this module re-exports it for existing imports."""

from tag2mask.models.weclip_decoder import (  # noqa: F401
    LayerMLP,
    QuickGELU,
    SelfAttention,
    TransformerBlock,
    WeCLIPDecoder,
    WeCLIPDecoderOutput,
    count_trainable_parameters,
    load_official_decoder_state,
    to_official_decoder_state,
)

__all__ = [
    "WeCLIPDecoder",
    "WeCLIPDecoderOutput",
    "load_official_decoder_state",
    "to_official_decoder_state",
    "count_trainable_parameters",
]
