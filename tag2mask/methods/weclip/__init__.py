"""WeCLIP (Zhang et al., "Frozen CLIP: A Strong Backbone for Weakly Supervised Semantic Segmentation", CVPR 2024).

Paper -> files:
- Frozen CLIP backbone + decoder (the decoder network is shared with the segmenter networks:
  :mod:`tag2mask.models.weclip_decoder`); the model with its online pseudo-labels (CLIP-ES-style
  CAMs from the shared :mod:`tag2mask.localization.cam_pipeline`): :mod:`.model`.
- Refinement module (RFM) of the CAM affinity: :mod:`.rfm`; PAR: :mod:`tag2mask.refinement.par`.
- Losses (bg/fg-balanced CE, affinity loss): :mod:`.losses`.
- Training on the engine (poly warm-up AdamW): :mod:`.train_task` with its data in :mod:`.data`;
  command ``tag2mask train weclip`` (:mod:`.cli`).
- Test time (multi-scale + flip, optional CRF): :mod:`.inference`; official checkpoints:
  :mod:`.convert` (``tag2mask convert weclip``); ONNX export (CLIP tower + decoder, fixed size): :mod:`.export`.
- The fully supervised setting: the segmenter recipe ``weclip-fs`` in :mod:`.recipe`.
Docs: docs/weclip.md.
"""
