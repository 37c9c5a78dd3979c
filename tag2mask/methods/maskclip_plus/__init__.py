"""MaskCLIP+ (Zhou, Loy & Dai, "Extract Free Dense Labels from CLIP", ECCV 2022).

Paper -> files:
- The MaskCLIP teacher (training-free) is the shared open-vocabulary segmenter
  :mod:`tag2mask.methods.ovss` (``maskclip`` with key smoothing / prompt denoising).
- MaskCLIP+ pseudo-label training and self-training, the data set settings and the
  text-head network: :mod:`.recipe` (the segmenter recipe ``maskclip+`` / ``maskclip+:SETTING``,
  trained by :mod:`tag2mask.segmenter`: ``tag2mask train segmenter --preset maskclip+``).
Docs: docs/segmenter.md (MaskCLIP+).
"""
