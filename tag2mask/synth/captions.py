"""Varied captions for synthetic scenes: templates x random object order x optional colour words.

Invariant relied on by training and tests: a caption mentions **every** labelled object class name
(as a whole word, possibly plural, e.g. "two stars") and the stuff name (as a whole word).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from tag2mask.synth.world import STUFF_CLASSES, object_class

# ``{objs}`` is a list like "a red star, a ring and two hearts"; ``{stuff}`` a stuff noun phrase.
TEMPLATES: tuple[str, ...] = (
    "a photo of {objs} on {stuff}.",
    "{objs} over {stuff}",
    "an image of {objs} with {stuff} in the background.",
    "{objs} in front of {stuff}.",
    "a picture showing {objs} on {stuff}",
    "{stuff} with {objs}.",
    "a rendering of {objs} against {stuff}.",
    "{objs} lying on {stuff}",
    "{objs} on {stuff}, seen from above.",
    "a close-up photo of {objs}, {stuff} behind.",
)

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def object_phrase(class_id: int, count: int, with_colour: bool) -> str:
    """Noun phrase for ``count`` instances of a class, e.g. ``"a red cross"`` or ``"two stars"``."""
    cls = object_class(class_id)
    head = f"{cls.colour_name} {cls.name}" if with_colour else cls.name
    if count == 1:
        return f"{_article(head)} {head}"
    noun = f"{cls.colour_name} {_plural(cls.name)}" if with_colour else _plural(cls.name)
    return f"{_NUMBER_WORDS.get(count, 'several')} {noun}"


def join_list(items: list[str]) -> str:
    """English enumeration: ``a``, ``a and b``, ``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def make_caption(
    rng: np.random.Generator,
    instance_class_ids: list[int],
    stuff: str,
    colour_prob: float = 0.5,
) -> str:
    """Caption naming every distinct class in ``instance_class_ids`` (one id per instance) and ``stuff``.

    Object order is shuffled (so captions don't leak depth order), each class gets its colour word with
    probability ``colour_prob``, and one of ``TEMPLATES`` is picked at random.
    """
    counts = Counter(instance_class_ids)
    classes = list(counts)
    rng.shuffle(classes)
    phrases = [object_phrase(c, counts[c], bool(rng.random() < colour_prob)) for c in classes]
    stuff_cls = next(s for s in STUFF_CLASSES if s.name == stuff)
    stuff_phrase = stuff_cls.phrases[int(rng.integers(len(stuff_cls.phrases)))]
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    text = template.format(objs=join_list(phrases), stuff=stuff_phrase)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text
