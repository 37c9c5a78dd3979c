"""FMA-WSSS (Yang & Gong, "Foundation Model Assisted Weakly Supervised Semantic Segmentation", WACV 2024).

Paper -> files:
- CoOp prompts on a frozen CLIP (classification and segmentation prompts): :mod:`.prompts`;
  the CLIP side (image features, masked-softmax GradCAM): :mod:`.model`.
- The prompt-training losses (multi-label contrastive, CAM activation): :mod:`.losses`;
  the per-stage settings and CAA refinement: :mod:`.config`.
- Prompt training on the engine: :mod:`.train_task` with its data in :mod:`.data`; command
  ``tag2mask train fma`` (:mod:`.cli`); a run's recipe and learned context as files: :mod:`.prompt_run`.
- CAM inference with learned prompts: :mod:`.inference`; ``tag2mask label --method fma``
  (:mod:`.label_cli`) writes coarse / fine seeds, with SAM proposals from the shared
  :mod:`tag2mask.proposals` (seeding works with any CAMs: ``tag2mask seed``).
- Stage 2 (Mask2Former on the seeds): the segmenter recipes ``fma`` / ``fma:coco`` in :mod:`.recipe`.
Docs: docs/fma.md.
"""
