"""FMA-WSSS (Yang & Gong, WACV 2024): CoOp prompts on a frozen CLIP, masked-softmax GradCAM,
contrastive and CAM-activation losses, per-stage presets. SAM-based seeding lives in
:mod:`tag2mask.proposals` (it works with any CAMs). See docs/fma.md.
"""

from tag2mask.methods.fma.config import PRESETS, CAASettings, PromptSettings, StageSettings, caa_refine, preset
from tag2mask.methods.fma.losses import cam_activation_loss, multilabel_contrastive_loss
from tag2mask.methods.fma.model import FMAClip, FMAOutput, masked_softmax
from tag2mask.methods.fma.prompts import PromptLearner

__all__ = [
    "PRESETS", "CAASettings", "PromptSettings", "StageSettings", "caa_refine", "preset",
    "cam_activation_loss", "multilabel_contrastive_loss", "FMAClip", "FMAOutput", "masked_softmax", "PromptLearner",
]
