"""Which methods ``tag2mask bench`` runs, and how one is built for one benchmark.

The two functions here are the harness's only contact with the methods: :func:`bench_methods` lists the
names ``--methods all`` means, :func:`build_segmenter` makes a predictor with the method's settings for a
benchmark. A method added elsewhere joins the bench by appearing in :func:`bench_methods`.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["bench_methods", "preset_name", "resolved_settings", "build_segmenter"]


def bench_methods() -> tuple[str, ...]:
    """The methods ``--methods all`` runs: the open-vocabulary methods ``tag2mask segment`` accepts."""
    from tag2mask.cli.segment_cmd import METHOD_CHOICES

    return tuple(METHOD_CHOICES)


def preset_name(preset: str, config: str) -> str:
    """``published`` -> ``published:<config>`` (the official config of that benchmark); others as given."""
    return f"published:{config}" if preset == "published" else preset


def resolved_settings(method: str, preset: str, config: str) -> dict[str, Any]:
    """Every setting ``method`` runs with on benchmark ``config`` (for the cell's settings and the report)."""
    from tag2mask.methods.ovss.presets import get_preset

    return get_preset(method, preset_name(preset, config)).as_dict()


def build_segmenter(method: str, preset: str, config: str, vocab: Any, models: "ModelVariants") -> Any:
    """A predictor of ``method`` (``predict(PIL image) -> result`` with ``.label`` ``(H, W)`` uint8).

    Label values: with a background class 0 is background and the vocabulary's classes are 1..K,
    otherwise 0..K-1 -- the benchmark's ground-truth values.
    """
    from tag2mask.methods.ovss.presets import get_preset
    from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter

    settings = get_preset(method, preset_name(preset, config))
    return OpenVocabSegmenter(models.get(settings.round_fp16_weights), vocab, method, preset=settings)


class ModelVariants:
    """The loaded CLIP and, made once when first asked for, its copy with fp16-rounded weights."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._rounded: Optional[Any] = None

    @property
    def fingerprint(self) -> Optional[str]:
        return getattr(self.model, "fingerprint", None)

    def get(self, fp16_rounded: bool) -> Any:
        """The model as loaded, or its fp16-rounded copy (what the official loaders run)."""
        if not fp16_rounded:
            return self.model
        if self._rounded is None:
            import copy

            from tag2mask.clip.loading import round_weights_to_fp16

            self._rounded = copy.deepcopy(self.model)
            round_weights_to_fp16(self._rounded)
            self._rounded.fingerprint = f"{self.fingerprint or 'unknown'}:fp16r"
        return self._rounded
