"""CLIP-ES (Lin et al., "CLIP is Also an Efficient Segmenter", CVPR 2023): pseudo-masks from tags.

Paper -> files:
- Softmax-GradCAM on a frozen CLIP with background words, the text-driven strategies (Sec. 3.3:
  sharpness-based prompt selection, Eq. 9; synonym fusion) and the class-aware attention-based
  affinity (CAA) inside the CAM boxes: :mod:`.pipeline` (:class:`~.pipeline.ClipES`, the presets),
  over the shared :mod:`tag2mask.localization.cam_pipeline` (GradCAM, affinity, boxes, scaling).
- Eq. 9 on the user's own images: :mod:`.prompt_selection`; command ``tag2mask prompts select``
  (:mod:`.prompts_cli`).
- Stage 2 (CAMs -> pseudo-masks: background score, dense CRF, PAMR; the confidence-guided
  loss's 0.95 ignore region): :mod:`.label_maps`; ``tag2mask label`` (the default ``--method``):
  :mod:`.label_cli`, its overlapped stages :mod:`.label_stages`.
- Stage 3 (DeepLab-v2 on the pseudo-masks): the segmenter recipe ``clip-es`` in :mod:`.recipe`,
  trained by :mod:`tag2mask.segmenter` (``tag2mask train segmenter --preset clip-es``).
Docs: docs/clip_es.md.
"""
