"""WeCLIP (CVPR 2024): frozen CLIP backbone + light decoder trained on online pseudo labels.

Components: :mod:`.decoder` (11-layer feature fusion + transformer decoder + affinity head),
:mod:`.losses` (balanced CE, affinity label and loss), :mod:`.rfm` (refinement module of the
CAM affinity). PAR lives in :mod:`tag2mask.refinement.par`, the lr schedule in
:mod:`tag2mask.engine.schedules.poly`.
"""

from tag2mask.methods.weclip.decoder import (
    WeCLIPDecoder,
    WeCLIPDecoderOutput,
    count_trainable_parameters,
    load_official_decoder_state,
    to_official_decoder_state,
)
from tag2mask.methods.weclip.losses import (
    AFF_LOSS_WEIGHT,
    SEG_LOSS_WEIGHT,
    WeCLIPLoss,
    affinity_loss,
    balanced_ce_loss,
    balanced_ce_terms,
    cams_to_affinity_label,
    radius_window_mask,
    weclip_total_loss,
)
from tag2mask.methods.weclip.rfm import (
    BOX_THRESHOLD,
    CAA_LAYERS,
    RFM_LAYERS,
    RefinedCams,
    caa_affinity,
    refine_image_cams,
    refine_with_affinity,
    rfm_affinity,
    rfm_keep_from_mass,
    rfm_keep_mask,
)

__all__ = [
    "WeCLIPDecoder",
    "WeCLIPDecoderOutput",
    "count_trainable_parameters",
    "load_official_decoder_state",
    "to_official_decoder_state",
    "AFF_LOSS_WEIGHT",
    "SEG_LOSS_WEIGHT",
    "WeCLIPLoss",
    "affinity_loss",
    "balanced_ce_loss",
    "balanced_ce_terms",
    "cams_to_affinity_label",
    "radius_window_mask",
    "weclip_total_loss",
    "BOX_THRESHOLD",
    "CAA_LAYERS",
    "RFM_LAYERS",
    "RefinedCams",
    "caa_affinity",
    "refine_image_cams",
    "refine_with_affinity",
    "rfm_affinity",
    "rfm_keep_from_mass",
    "rfm_keep_mask",
]
