"""Class lists of the synthetic world: object classes (shape + colour + pattern) and stuff textures.

The world is designed to be *learnable quickly* by a tiny CLIP trained from scratch on CPU, so every
object class is identified redundantly by three cues:

* a distinct **shape family** (star, ring, cross, ...), given as polygons in a unit frame;
* a characteristic **colour family** (base RGB, jittered slightly per instance);
* an optional **surface pattern** (stripes, dots, checker) in a secondary colour.

Label ids follow the VOC convention: ``0`` is background, object classes are ``1..N`` in the order of
``OBJECT_CLASSES`` (``OBJECT_CLASSES[k].class_id == k + 1``). Stuff classes (backgrounds) are *not*
label ids in the ground truth; they only appear in captions and in ``SceneSample.stuff``.
The textures themselves are generated in :mod:`tag2mask.synth.textures`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

# A shape is a list of drawing operations on a unit frame (radius ~1 around the origin, y pointing
# down as in images). Each op is ``(polygon (K, 2) float64, fill)`` where fill 1 paints the object and
# fill 0 erases (holes: ring, crescent). Ops are applied in order.
ShapeOps = list[tuple[np.ndarray, int]]


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2.0 * math.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star() -> ShapeOps:
    outer = _regular(5, 1.0)
    inner = _regular(5, 0.42, phase=-math.pi / 2 + math.pi / 5)
    pts = np.empty((10, 2))
    pts[0::2], pts[1::2] = outer, inner
    return [(pts, 1)]


def _ring() -> ShapeOps:
    # Thick annulus: the hole shows the background, which separates it from ``disk``.
    return [(_circle(48, 1.0), 1), (_circle(40, 0.55), 0)]


def _cross() -> ShapeOps:
    a, b = 0.32, 1.0  # arm half-width, arm length
    pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    return [(np.asarray(pts, dtype=np.float64), 1)]


def _heart() -> ShapeOps:
    t = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1) / 17.0  # centre the lobes+tip and scale to radius ~1
    return [(pts, 1)]


def _triangle() -> ShapeOps:
    return [(_regular(3, 1.0), 1)]


def _square() -> ShapeOps:
    s = 0.78
    return [(np.asarray([(-s, -s), (s, -s), (s, s), (-s, s)], dtype=np.float64), 1)]


def _disk() -> ShapeOps:
    return [(_circle(48, 1.0), 1)]


def _crescent() -> ShapeOps:
    return [(_circle(48, 1.0), 1), (_circle(48, 0.85, cx=0.45, cy=-0.1), 0)]


def _diamond() -> ShapeOps:
    # Elongated rhombus (aspect ~0.55) so that it stays distinct from a rotated square.
    return [(np.asarray([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)], dtype=np.float64), 1)]


def _arrow() -> ShapeOps:
    pts = [(-1.0, -0.22), (0.15, -0.22), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6), (0.15, 0.22), (-1.0, 0.22)]
    return [(np.asarray(pts, dtype=np.float64), 1)]


def _hexagon() -> ShapeOps:
    return [(_regular(6, 1.0, phase=0.0), 1)]


def _bolt() -> ShapeOps:
    pts = [(0.15, -1.0), (-0.55, 0.12), (-0.05, 0.12), (-0.3, 1.0), (0.55, -0.2), (0.05, -0.2), (0.4, -1.0)]
    return [(np.asarray(pts, dtype=np.float64), 1)]


@dataclass(frozen=True)
class ObjectClass:
    """One object class: label id, name, shape generator and appearance.

    ``rgb`` is the base colour (uint8 triple); ``pattern`` is ``"solid" | "stripes" | "dots" |
    "checker"``, painted in ``pattern_rgb``. ``aspect_jitter`` bounds the random stretch of the
    shape (kept small for square/diamond so they stay distinguishable).
    """

    class_id: int
    name: str
    colour_name: str
    rgb: tuple[int, int, int]
    shape: Callable[[], ShapeOps]
    pattern: str = "solid"
    pattern_rgb: tuple[int, int, int] = (0, 0, 0)
    aspect_jitter: float = 0.15


# Colours are chosen to avoid the stuff hues (green grass, blue water/sky, brick red, beige sand,
# brown wood) as much as 12 classes allow; pattern gives a second cue where hues are close.
OBJECT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass(1, "star", "yellow", (245, 215, 35), _star),
    ObjectClass(2, "ring", "orange", (250, 135, 20), _ring),
    ObjectClass(3, "cross", "red", (225, 25, 35), _cross),
    ObjectClass(4, "heart", "pink", (250, 110, 180), _heart, "dots", (255, 255, 255)),
    ObjectClass(5, "triangle", "cyan", (30, 205, 225), _triangle, "stripes", (10, 70, 90)),
    ObjectClass(6, "square", "purple", (135, 50, 195), _square, "checker", (70, 20, 105), 0.06),
    ObjectClass(7, "disk", "white", (245, 245, 240), _disk),
    ObjectClass(8, "crescent", "silver", (180, 180, 192), _crescent),
    ObjectClass(9, "diamond", "lime", (150, 235, 40), _diamond, "stripes", (40, 90, 10), 0.06),
    ObjectClass(10, "arrow", "black", (25, 25, 28), _arrow),
    ObjectClass(11, "hexagon", "navy", (30, 40, 135), _hexagon, "dots", (250, 220, 60)),
    ObjectClass(12, "bolt", "magenta", (225, 30, 225), _bolt),
)

OBJECT_NAMES: tuple[str, ...] = tuple(c.name for c in OBJECT_CLASSES)
NUM_OBJECT_CLASSES: int = len(OBJECT_CLASSES)
#: Label names indexed by id: ``CLASS_NAMES[0] == "background"``, ``CLASS_NAMES[k]`` = object k.
CLASS_NAMES: tuple[str, ...] = ("background",) + OBJECT_NAMES


@dataclass(frozen=True)
class StuffClass:
    """A background texture class. ``phrases`` are caption noun phrases, each containing ``name``."""

    name: str
    phrases: tuple[str, ...]


STUFF_CLASSES: tuple[StuffClass, ...] = (
    StuffClass("grass", ("grass", "green grass", "the grass", "a grass field")),
    StuffClass("water", ("water", "blue water", "the water", "rippling water")),
    StuffClass("sky", ("the sky", "a blue sky", "sky", "a cloudy sky")),
    StuffClass("brick", ("a brick wall", "brick", "old brick", "a brick path")),
    StuffClass("sand", ("sand", "the sand", "beach sand", "sand dunes")),
    StuffClass("wood", ("wood", "a wood floor", "wood planks", "dark wood")),
)
STUFF_NAMES: tuple[str, ...] = tuple(s.name for s in STUFF_CLASSES)


def object_class(key: int | str) -> ObjectClass:
    """Look up an object class by label id (1..N) or by name; raises ``KeyError`` if unknown."""
    if isinstance(key, str):
        for c in OBJECT_CLASSES:
            if c.name == key:
                return c
        raise KeyError(f"unknown object class {key!r}; known: {', '.join(OBJECT_NAMES)}")
    if not 1 <= int(key) <= NUM_OBJECT_CLASSES:
        raise KeyError(f"object class id {key} out of range 1..{NUM_OBJECT_CLASSES}")
    return OBJECT_CLASSES[int(key) - 1]
