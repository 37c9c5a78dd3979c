"""Prompt template sets: tuples of ``str.format`` strings with one ``{}`` slot for the class name.

* ``CLIP_ES``     -- the single template used by CLIP-ES and WeCLIP.
* ``IMAGENET_80`` -- the 80 templates OpenAI published for zero-shot ImageNet (order preserved:
  the order does not change the averaged embedding, but keeping it makes diffs against other
  code bases trivial).
* ``MASKCLIP_85`` -- ``IMAGENET_80`` plus the 5 "scene" templates MaskCLIP adds.
* ``PHOTO``       -- the plain ``"a photo of a {}."``.
"""

from __future__ import annotations

from typing import Sequence, Union

CLIP_ES: tuple[str, ...] = ("a clean origami {}.",)

PHOTO: tuple[str, ...] = ("a photo of a {}.",)

IMAGENET_80: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

MASKCLIP_85: tuple[str, ...] = IMAGENET_80 + (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "clip-es": CLIP_ES,
    "imagenet80": IMAGENET_80,
    "maskclip85": MASKCLIP_85,
    "photo": PHOTO,
}


def _check(template: str) -> str:
    if not isinstance(template, str):
        raise TypeError(f"a prompt template must be a string, got {type(template).__name__}")
    if template.count("{}") != 1:
        raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}' slot for the class name")
    return template


def get_templates(name_or_list: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """Resolve a template-set name (see ``TEMPLATE_SETS``) or validate an explicit list.

    A string containing ``{}`` is taken as a single literal template.  Raises ``KeyError``
    listing the known names for an unknown set, ``ValueError`` for an empty list or a template
    without exactly one ``{}``.
    """
    if isinstance(name_or_list, str):
        if "{}" in name_or_list:
            return (_check(name_or_list),)
        key = name_or_list.strip().lower().replace("_", "-")
        aliases = {"clipes": "clip-es", "imagenet": "imagenet80", "imagenet-80": "imagenet80",
                   "maskclip": "maskclip85", "maskclip-85": "maskclip85"}
        key = aliases.get(key, key)
        if key not in TEMPLATE_SETS:
            raise KeyError(
                f"unknown template set {name_or_list!r}; choose one of {sorted(TEMPLATE_SETS)} "
                "or pass templates containing '{}'"
            )
        return TEMPLATE_SETS[key]
    templates = tuple(_check(t) for t in name_or_list)
    if not templates:
        raise ValueError("template list is empty; give at least one template such as 'a photo of a {}.'")
    return templates


__all__ = ["CLIP_ES", "PHOTO", "IMAGENET_80", "MASKCLIP_85", "TEMPLATE_SETS", "get_templates"]
