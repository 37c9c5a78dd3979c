"""Training-free open-vocabulary segmentation: MaskCLIP, SCLIP, ClearCLIP and NACLIP.

The methods differ only in how the last block of CLIP's ViT is run, so they share one folder.
Paper -> files:
- MaskCLIP (ECCV 2022: value embeddings of the last block; key smoothing and prompt
  denoising): :mod:`.last_block` (``maskclip``) and :mod:`.maskclip_refine`.
- SCLIP (correlative self-attention), ClearCLIP (query-query attention without residual / FFN),
  NACLIP (key-key attention + Gaussian neighbourhood, no residual / FFN): :mod:`.last_block`.
- The shared pipeline (resize, whole / sliding inference, text matching, background, PAMR):
  :mod:`.segmenter` with :mod:`.windows`; settings ``default`` / ``published`` (each method's
  official harness): :mod:`.presets`. Commands: ``tag2mask segment``, ``serve``, ``demo``.
Docs: docs/open_vocabulary.md.
"""
