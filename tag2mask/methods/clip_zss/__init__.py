"""CLIP-ZSS ("CLIP Is Also a Good Teacher", Chen, Deguchi, Zhang, Zheng, Murase, 2024): a closed-set
segmentation network taught by a frozen CLIP to segment unseen classes, with no CLIP image tower at
test time. A reimplementation from the paper's equations: no official code exists.

Paper -> files: read :mod:`.method` first (the training pipeline in one place), then its parts: :mod:`.teacher`
(frozen CLIP), :mod:`.glm` (global learning module), :mod:`.regions` (PLM pseudo-labels),
:mod:`.synthesizer` (PLM pseudo class weights), :mod:`.losses` (ZegCLIP's NEL loss),
:mod:`.inference` (the student alone), :mod:`.export` (the student + text head of one class list as ONNX), :mod:`tag2mask.vocab.zero_shot_splits` (seen / unseen protocols, shared with ``eval``), :mod:`.config`
(every value the paper leaves open, marked as assumed). Training runs on the engine:
:mod:`tag2mask.methods.clip_zss.train_task`; command: ``tag2mask train clip-zss`` (:mod:`.cli`); docs/clip_zss.md.
"""
