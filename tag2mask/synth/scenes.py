"""Scene generator: stuff texture + distractors + 1..4 occluding objects, with exact GT and a caption.

Pipeline of :func:`generate_scene` (all randomness from ``np.random.default_rng(seed)``, so a seed
fully determines the sample):

1. choose a stuff class and the objects (class, size 20-60 % of the side, rotation, aspect, position);
2. rasterise every object's polygons at 2x with PIL and box-downsample -> anti-aliased alpha; the
   hard GT mask is ``alpha >= 0.5``;
3. paint hard masks in depth order into an instance map, drop objects that end up < ``min_visible``
   of their area visible (or with too few interior pixels), and re-paint, so the dropped object is
   neither in the image, the mask nor the labels (labels and mask always agree);
4. render: texture, background-coloured distractor blobs/lines (not objects), objects composited
   with alpha (colour jitter, shading, class pattern), Gaussian image noise;
5. GT mask: class ids from the instance map, optional 1-px void (255) band on the lower-depth side
   of every instance boundary (background around objects, occluded object next to its occluder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from tag2mask.synth.captions import make_caption
from tag2mask.synth.textures import render_stuff
from tag2mask.synth.world import NUM_OBJECT_CLASSES, OBJECT_CLASSES, STUFF_NAMES, ObjectClass

VOID_LABEL = 255


@dataclass(frozen=True)
class ObjectInstance:
    """One kept object of a scene.

    ``bbox`` is ``(x0, y0, x1, y1)`` of its *visible* pixels, 0-based, end-exclusive; ``area`` the
    number of visible pixels (void band included); ``visible_fraction`` = area / unoccluded area.
    """

    class_id: int
    name: str
    colour_name: str
    bbox: tuple[int, int, int, int]
    area: int
    visible_fraction: float


@dataclass
class SceneSample:
    """A synthetic image with its ground truth.

    image: (H, W, 3) uint8 RGB.
    mask: (H, W) uint8; 0 background, 1..N object class ids, 255 void outline (when enabled).
    labels: distinct object class ids (1..N) present, in first-appearance (back-to-front) order.
    label_names: class names matching ``labels``.
    stuff: the background texture name (one of ``STUFF_NAMES``); not a label id in ``mask``.
    caption: text naming every labelled class and the stuff.
    objects: per-instance details (back to front); may repeat a class.
    seed: the seed that generated this sample.
    """

    image: np.ndarray
    mask: np.ndarray
    labels: list[int]
    label_names: list[str]
    stuff: str
    caption: str
    objects: list[ObjectInstance] = field(default_factory=list)
    seed: int = -1


@dataclass
class _Placed:
    """An object after placement and rasterisation (internal)."""

    cls: ObjectClass
    cx: float
    cy: float
    radius: float
    angle: float
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels, end-exclusive
    alpha: np.ndarray  # (y1-y0, x1-x0) float32 in [0, 1], anti-aliased coverage
    hard: np.ndarray  # (y1-y0, x1-x0) bool, alpha >= 0.5


def _transform(pts: np.ndarray, cx: float, cy: float, r: float, angle: float, aspect: float) -> np.ndarray:
    """Unit-frame polygon (K, 2) -> image coordinates: stretch by aspect, rotate, scale, translate."""
    c, s = math.cos(angle), math.sin(angle)
    x = pts[:, 0] * aspect
    y = pts[:, 1] / aspect
    return np.stack([cx + r * (c * x - s * y), cy + r * (s * x + c * y)], axis=1)


def _rasterise(cls: ObjectClass, cx: float, cy: float, r: float, angle: float, aspect: float, size: int) -> _Placed | None:
    """Rasterise a class's shape ops at 2x inside its bounding box; ``None`` if fully off-image."""
    ops = [(_transform(p, cx, cy, r, angle, aspect), fill) for p, fill in cls.shape()]
    allpts = np.concatenate([p for p, _ in ops])
    x0 = max(int(math.floor(allpts[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(allpts[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(allpts[:, 0].max())) + 2, size)
    y1 = min(int(math.ceil(allpts[:, 1].max())) + 2, size)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", (2 * (x1 - x0), 2 * (y1 - y0)), 0)
    draw = ImageDraw.Draw(canvas)
    offset = np.array([x0, y0], dtype=np.float64)
    for pts, fill in ops:
        # +0.5 then *2 maps image pixel centres onto the 2x grid's pixel centres (PIL's convention).
        draw.polygon(((pts - offset + 0.5) * 2.0 - 0.5).ravel().tolist(), fill=255 * fill)
    alpha = np.asarray(canvas.reduce(2), dtype=np.float32) * np.float32(1.0 / 255.0)
    return _Placed(cls, cx, cy, r, angle, (x0, y0, x1, y1), alpha, alpha >= 0.5)


def _paint_instances(objs: list[_Placed], size: int) -> np.ndarray:
    """Depth-ordered instance map (H, W) uint8: 0 = background, k = objs[k-1] (later covers earlier)."""
    inst = np.zeros((size, size), dtype=np.uint8)
    for k, o in enumerate(objs, start=1):
        x0, y0, x1, y1 = o.box
        inst[y0:y1, x0:x1][o.hard] = k
    return inst


def void_band(inst: np.ndarray) -> np.ndarray:
    """1-px void band (H, W) bool: pixels with a 4-neighbour of *higher* instance index.

    Marking only the lower side keeps the band 1 px wide; around an object it falls on the
    background (as VOC's outline does), between objects on the occluded one.
    """
    nmax = np.zeros_like(inst)
    np.maximum(nmax[1:], inst[:-1], out=nmax[1:])
    np.maximum(nmax[:-1], inst[1:], out=nmax[:-1])
    np.maximum(nmax[:, 1:], inst[:, :-1], out=nmax[:, 1:])
    np.maximum(nmax[:, :-1], inst[:, 1:], out=nmax[:, :-1])
    return nmax > inst


def _visibility(objs: list[_Placed], inst: np.ndarray, void: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per object: visible pixel count, interior (non-void) count, full (unoccluded) hard area."""
    n = len(objs) + 1
    visible = np.bincount(inst.ravel(), minlength=n)[1:]
    interior = np.bincount(inst[~void], minlength=n)[1:]
    full = np.array([int(o.hard.sum()) for o in objs])
    return visible, interior, full


def _object_colour_field(rng: np.random.Generator, o: _Placed) -> np.ndarray:
    """Colour of object ``o`` over its box: (h, w, 3) float32 — jittered base, class pattern, shading."""
    x0, y0, x1, y1 = o.box
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - o.cy) / o.radius
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - o.cx) / o.radius
    c, s = math.cos(o.angle), math.sin(o.angle)
    u = xx * c + yy * s  # object-frame coordinates, so patterns rotate with the object
    v = -xx * s + yy * c
    base = np.asarray(o.cls.rgb, dtype=np.float32) * rng.uniform(0.88, 1.08) + rng.uniform(-12, 12, 3)
    patt = o.cls.pattern
    if patt == "stripes":
        on = (np.sin(u * np.float32(math.pi * 3.5)) > 0).astype(np.float32)
    elif patt == "dots":
        p = np.float32(0.5)
        du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
        on = ((du * du + dv * dv) < (0.3 * p) ** 2).astype(np.float32)
    elif patt == "checker":
        p = np.float32(0.55)
        on = np.mod(np.floor(u / p) + np.floor(v / p), 2).astype(np.float32)
    else:
        on = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)
    second = np.asarray(o.cls.pattern_rgb, dtype=np.float32)
    phi = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + np.float32(rng.uniform(0.0, 0.18)) * (xx * math.cos(phi) + yy * math.sin(phi))
    sheen = 25.0 * (shade - 1.0)  # additive part, else shading is invisible on dark classes (arrow)
    out = np.empty(shade.shape + (3,), dtype=np.float32)
    for c in range(3):  # per channel: broadcasting over a trailing axis of 3 is ~10x slower
        out[..., c] = (base[c] + (second[c] - base[c]) * on) * shade + sheen
    return out


_NOISE_BANKS: dict[int, np.ndarray] = {}


def _noise_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit Gaussian noise (size, size, 3) float32: a random crop of a fixed, lazily built bank.

    Drawing 3*size^2 normals per image would cost more than the whole texture, and i.i.d. noise
    need not differ between images; the crop offset (from ``rng``) keeps it seed-deterministic.
    """
    bank = _NOISE_BANKS.get(size)
    if bank is None:
        bank = np.random.default_rng(12345).standard_normal((size + 97, 3 * size + 97), dtype=np.float32)
        _NOISE_BANKS[size] = bank
    oy, ox = rng.integers(0, 98, 2)
    return bank[oy:oy + size, ox:ox + 3 * size].reshape(size, size, 3)


def _draw_distractors(rng: np.random.Generator, img: np.ndarray, n: int) -> np.ndarray:
    """Small blobs/lines in background-like colours (not objects), drawn on ``img`` (H, W, 3) float32."""
    if n <= 0:
        return img
    size = img.shape[0]
    pil = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    mean = img.reshape(-1, 3).mean(axis=0)
    for _ in range(n):
        colour = tuple(int(v) for v in np.clip(mean * rng.uniform(0.55, 1.35) + rng.uniform(-15, 15, 3), 0, 255))
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            rx, ry = rng.uniform(1.5, 6, 2)
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)
        else:
            length, theta = rng.uniform(8, 40), rng.uniform(0, 2 * math.pi)
            draw.line((x, y, x + length * math.cos(theta), y + length * math.sin(theta)), fill=colour,
                      width=int(rng.integers(1, 4)))
    return np.asarray(pil, dtype=np.float32)


def _place_objects(
    rng: np.random.Generator, size: int, n: int, scale: tuple[float, float]
) -> list[_Placed]:
    """Sample and rasterise ``n`` objects (back to front). Duplicated classes happen ~15 % of scenes."""
    ids = rng.choice(NUM_OBJECT_CLASSES, size=n, replace=bool(rng.random() < 0.15))
    objs: list[_Placed] = []
    for cid in ids:
        cls = OBJECT_CLASSES[int(cid)]
        r = 0.5 * size * rng.uniform(*scale)
        # Centres keep >= ~3/4 of the radius inside the frame: some border truncation, never tiny.
        cx, cy = rng.uniform(0.75 * r, size - 0.75 * r, 2)
        angle = rng.uniform(0, 2 * math.pi)
        aspect = 1.0 + rng.uniform(-cls.aspect_jitter, cls.aspect_jitter)
        placed = _rasterise(cls, float(cx), float(cy), float(r), float(angle), float(aspect), size)
        if placed is not None:
            objs.append(placed)
    return objs


def generate_scene(
    seed: int,
    size: int = 224,
    *,
    min_objects: int = 1,
    max_objects: int = 4,
    scale: tuple[float, float] = (0.2, 0.6),
    min_visible: float = 0.25,
    min_pixels: int | None = None,
    void_outline: bool = True,
    distractors: int = 6,
    noise_std: tuple[float, float] = (1.5, 5.0),
    colour_word_prob: float = 0.5,
) -> SceneSample:
    """Generate one deterministic scene from ``seed``.

    Args:
        seed: any non-negative int; same seed (and arguments) -> identical sample.
        size: image side in pixels (square images).
        min_objects, max_objects: number of objects drawn (before occlusion dropping), inclusive.
        scale: object diameter range as a fraction of ``size``.
        min_visible: objects with a smaller visible fraction of their area are removed entirely.
        min_pixels: objects with fewer non-void visible pixels are removed too; default scales with
            the image area (40 px at 224, at least 4).
        void_outline: write the 1-px 255 band around instances into ``mask`` (VOC style).
        distractors: maximum number of background-coloured blobs/lines (uniform 0..distractors).
        noise_std: range of the per-image Gaussian noise sigma (in 0..255 units).
        colour_word_prob: probability that a class is captioned with its colour word.

    Returns:
        A :class:`SceneSample`; ``labels`` is never empty.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    rng = np.random.default_rng(seed)
    stuff = STUFF_NAMES[int(rng.integers(len(STUFF_NAMES)))]

    if min_pixels is None:
        min_pixels = max(4, round(40 * (size / 224) ** 2))
    objs, inst, void, visible, full = _place_visible_objects(rng, seed, size, min_objects, max_objects, scale,
                                                             min_visible, min_pixels)
    image = _render_image(rng, stuff, objs, size, distractors, noise_std)

    lut = np.array([0] + [o.cls.class_id for o in objs], dtype=np.uint8)
    mask = lut[inst]
    if void_outline:
        mask[void] = VOID_LABEL

    instances: list[ObjectInstance] = []
    for k, o in enumerate(objs, start=1):
        ys, xs = np.nonzero(inst == k)
        instances.append(ObjectInstance(
            class_id=o.cls.class_id, name=o.cls.name, colour_name=o.cls.colour_name,
            bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            area=int(visible[k - 1]), visible_fraction=float(visible[k - 1] / max(full[k - 1], 1)),
        ))
    labels = list(dict.fromkeys(o.class_id for o in instances))
    caption = make_caption(rng, [o.class_id for o in instances], stuff, colour_word_prob)
    return SceneSample(
        image=image, mask=mask, labels=labels, label_names=[OBJECT_CLASSES[c - 1].name for c in labels],
        stuff=stuff, caption=caption, objects=instances, seed=int(seed),
    )


def _place_visible_objects(rng: np.random.Generator, seed: int, size: int, min_objects: int, max_objects: int,
                           scale: tuple[float, float], min_visible: float, min_pixels: int):
    """Objects placed and painted so that each stays visible enough (see :func:`generate_scene`).

    Returns ``(objects, inst, void, visible, full)``: ``inst`` ``(size, size)`` instance index map (0 =
    none, k = ``objects[k-1]``), ``void`` its boundary band, per object the visible and interior-visible
    pixel counts of :func:`_visibility` and its full area.
    """
    objs: list[_Placed] = []
    for _attempt in range(100):  # the top object is nearly always kept; retries are for tiny images
        objs = _place_objects(rng, size, int(rng.integers(min_objects, max_objects + 1)), scale)
        while objs:
            inst = _paint_instances(objs, size)
            void = void_band(inst)
            visible, interior, full = _visibility(objs, inst, void)
            keep = (visible >= min_visible * np.maximum(full, 1)) & (interior >= min_pixels)
            if keep.all():
                break
            # Dropping an object only uncovers the ones behind it, so re-painting converges quickly.
            objs = [o for o, k in zip(objs, keep) if k]
        if objs:
            break
    if not objs:
        raise RuntimeError(f"seed {seed}: no object survived placement at size {size}; lower min_pixels")
    return objs, inst, void, visible, full


def _render_image(rng: np.random.Generator, stuff: str, objs: list[_Placed], size: int, distractors: int,
                  noise_std: tuple[float, float]) -> np.ndarray:
    """``(size, size, 3)`` uint8: the stuff texture, distractors, the objects' colour fields, noise."""
    img = render_stuff(stuff, rng, size)
    img = _draw_distractors(rng, img, int(rng.integers(0, distractors + 1)))
    for o in objs:
        x0, y0, x1, y1 = o.box
        col = _object_colour_field(rng, o)
        for c in range(3):
            patch = img[y0:y1, x0:x1, c]
            patch += (col[..., c] - patch) * o.alpha
    img += _noise_crop(rng, size) * np.float32(rng.uniform(*noise_std))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
