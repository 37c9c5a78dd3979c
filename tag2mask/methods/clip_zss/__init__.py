"""CLIP-ZSS ("CLIP Is Also a Good Teacher", Chen, Deguchi, Zhang, Zheng, Murase, 2024): a closed-set
segmentation network taught by a frozen CLIP to segment unseen classes, with no CLIP image tower at
test time. A reimplementation from the paper's equations: no official code exists.

Read :mod:`.method` first (the training pipeline in one place), then its parts: :mod:`.teacher`
(frozen CLIP), :mod:`.glm` (global learning module), :mod:`.regions` (PLM pseudo-labels),
:mod:`.synthesizer` (PLM pseudo class weights), :mod:`.losses` (ZegCLIP's NEL loss),
:mod:`.inference` (the student alone), :mod:`.splits` (seen / unseen protocols), :mod:`.config`
(every value the paper leaves open, marked as assumed). Training runs on the engine:
:mod:`tag2mask.methods.clip_zss.train_task`; command: ``tag2mask train clip-zss``; docs/clip_zss.md.
"""

from tag2mask.methods.clip_zss.config import ASSUMED, ClipZssConfig
from tag2mask.methods.clip_zss.method import ClassLayout, ClipZss, UnseenNameError
from tag2mask.methods.clip_zss.splits import SPLITS, ZeroShotSplit, get_split

__all__ = ["ASSUMED", "ClipZssConfig", "ClassLayout", "ClipZss", "UnseenNameError", "SPLITS", "ZeroShotSplit",
           "get_split"]
