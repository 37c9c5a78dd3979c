"""The named mIoU averaging rules (no NumPy here: the CLI lists them in ``--help``).

Re-exported by :mod:`tag2mask.evaluation.miou`, which explains them.
"""

from __future__ import annotations

__all__ = ["MIOU_RULES", "DEFAULT_MIOU_RULE", "check_miou_rule"]

#: mIoU averaging rules: name -> description (reports print the description next to the name).
MIOU_RULES: dict[str, str] = {
    "gt_or_pred": "mean over classes present in the ground truth or the prediction (CLIP-ES, mmseg)",
    "gt": "mean over classes present in the ground truth (WeCLIP)",
}
DEFAULT_MIOU_RULE = "gt_or_pred"


def check_miou_rule(rule: str) -> str:
    """``rule`` if it is a known mIoU rule, else a ``ValueError`` listing the rules."""
    if rule not in MIOU_RULES:
        raise ValueError(f"unknown mIoU rule {rule!r}; choose one of: {', '.join(MIOU_RULES)}")
    return rule
