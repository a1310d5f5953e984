"""The shapes world: procedural scenes and their captions, genkit-mini's training data.

A scene is one or two flat-coloured shapes on a plain light background. Every scene is
drawn from a seed, so the same seed always gives the same pixels and the same caption.

Two colour-shape pairs (`HELD_OUT_PAIRS`) never appear in training scenes: asking the
model for them measures whether it composes colour and shape rather than memorising
pairs. A few caption phrasings (`HELD_OUT_TEMPLATES`) are kept for evaluation only.

`EXTRA_SHAPES` (a five-pointed star, a heart, a cross, a ring, a crescent and a diamond) can be
drawn and captioned but are never part of the training distribution: `random_scene` draws from
`SHAPES` only. They are what a LoRA can teach genkit-mini afterwards (`examples/lora_star.py`).
Every shape's outline is `_outline`: filled polygons and ellipses, and for the ring a cut-out.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
# drawable, never in training scenes: `single_object_scene(rng, shape="star")`
EXTRA_SHAPES = ("star", "heart", "cross", "ring", "crescent", "diamond")
STAR_INNER = 0.5  # inner (notch) radius as a fraction of the outer (tip) radius; a regular pentagram has 0.382
STAR_OUTER = 1.35  # tip radius as a multiple of the object's radius
# The other extra shapes, in multiples of the object's radius r. Each covers about as much as the
# circle's 3.14 r^2 (heart 3.17, cross 3.2, ring 2.9, crescent 2.07, diamond 1.92, the triangle 1.87)
# and reaches at most
# 1.2 r from its centre along either axis, so two objects of a two-object scene (centres at least
# 0.4 apart, radii at most 0.16) never overlap.
HEART_WIDTH = 1.2  # half-width at the lobes
CROSS_ARM, CROSS_HALF_WIDTH = 1.2, 0.4  # plus sign: centre to arm end, half an arm's thickness
RING_OUTER, RING_INNER = 1.15, 0.55  # annulus: outer radius, hole radius as a fraction of the outer
CRESCENT_OUTER, CRESCENT_CUT, CRESCENT_SHIFT = 1.2, 1.0, 0.6  # disc minus a disc this far to the right
DIAMOND_HALF_HEIGHT, DIAMOND_HALF_WIDTH = 1.2, 0.8  # rhombus 1.5 times taller than wide, corners up/down/left/right
COLORS = {  # name -> RGB drawn (training jitters it a little)
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 25),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 185),
}
POSITIONS = {  # name -> centre as a fraction of (width, height)
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
SIZES = {"small": 0.11, "large": 0.18}  # name -> radius as a fraction of the width
TWO_OBJECT_RADIUS = (0.12, 0.16)  # radius range when two objects share the canvas
RELATIONS = ("left of", "right of", "above", "below", "and")
HELD_OUT_PAIRS = frozenset({("green", "triangle"), ("purple", "square")})

POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left", "on the left side"),
    "right": ("on the right", "at the right", "to the right", "on the right side"),
    "top": ("at the top", "on the top", "near the top", "at the top side"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom", "at the bottom side"),
    "center": ("in the center", "in the middle", "at the center", "in the centre"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

# Single-object phrasings. {size} and {pos} may be empty; `_tidy` removes the gaps.
TRAIN_TEMPLATES = (
    "a {size} {color} {shape} {pos}",
    "{color} {shape}, {pos}",
    "{Pos} there is a {size} {color} {shape}",
    "a {shape}, {color}, {pos}",
    "a {size} {color} {shape} positioned {pos}",
    "{size} {shape} in {color} {pos}",
    "an image of a {size} {color} {shape} {pos}",
    "{color} {size} {shape} {pos}",
    "a picture showing a {color} {shape} {pos}",
)
HELD_OUT_TEMPLATES = (
    "draw one {size} {color} {shape} {pos}",
    "{Pos}: a {color} {shape}",
    "i would like a {color} {shape} {pos}, please",
    "a single {shape} coloured {color} {pos}",
)
TWO_OBJECT_TEMPLATES = {  # relation -> phrasings with {a}, {b}, {rel}
    "and": ("a {a} and a {b}", "{a} and {b}", "a {a} next to a {b}"),
    "spatial": ("a {a} {rel} a {b}", "{a} {rel} {b}", "there is a {a} {rel} a {b}"),
}
SIDE_BY_SIDE_TEMPLATE = "a {a} {pa} and a {b} {pb}"  # "a red circle on the left and a blue square on the right"
SIDE_BY_SIDE = {  # relation -> (position of a, position of b) in "on the left and on the right" captions
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: what it is and where it sits, in fractions of the canvas."""

    shape: str
    color: str
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height
    radius: float  # fraction of width
    position: str | None = None  # named position, when the scene placed it at one
    size: str | None = None  # named size, single-object scenes only


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    caption: str
    relation: str | None = None  # two-object scenes: how objects[0] relates to objects[1]
    background: tuple[int, int, int] = (238, 238, 236)
    stated: frozenset = field(default_factory=frozenset)  # attributes the caption names


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,:])", r"\1", text)
    text = re.sub(r"[,:]\s*$", "", text)
    text = re.sub(r"^[,:]\s*", "", text)
    text = re.sub(r"\b([aA]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"
    return text.strip()


def single_caption(color, shape, *, position=None, size=None, template=None, rng=None) -> str:
    """Caption for one object; position and size are left out when None."""
    rng = rng or random.Random(0)
    template = template if template is not None else rng.choice(TRAIN_TEMPLATES)
    pos = rng.choice(POSITION_PHRASES[position]) if position else ""
    text = template.format(size=size or "", color=color, shape=shape, pos=pos, Pos=pos)
    return _tidy(text)


def two_object_caption(a, b, relation, *, rng=None, template=None) -> str:
    """Caption for two objects; `a` and `b` are (colour, shape) pairs."""
    rng = rng or random.Random(0)
    a_text, b_text = f"{a[0]} {a[1]}", f"{b[0]} {b[1]}"
    if relation == "and":
        template = template or rng.choice(TWO_OBJECT_TEMPLATES["and"])
        return _tidy(template.format(a=a_text, b=b_text))
    if template is None and rng.random() < 0.3:  # "a red circle on the left and a blue square on the right"
        pa, pb = SIDE_BY_SIDE[relation]
        return _tidy(SIDE_BY_SIDE_TEMPLATE.format(a=a_text, b=b_text, pa=rng.choice(POSITION_PHRASES[pa]),
                                                  pb=rng.choice(POSITION_PHRASES[pb])))
    template = template or rng.choice(TWO_OBJECT_TEMPLATES["spatial"])
    return _tidy(template.format(a=a_text, b=b_text, rel=rng.choice(RELATION_PHRASES[relation])))


def words(text: str) -> list[str]:
    """A text's words as a caption's are counted: lower case, without punctuation."""
    return re.findall(r"[^\W_]+", text.lower())


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word a caption of this world can hold: its phrasings' own words (the held-out ones, asked in evaluation,
    too), the colours, the training shapes (not `EXTRA_SHAPES`, which only a LoRA teaches), sizes, positions and
    relations. The words genkit-mini was trained to read."""
    phrasings = [*TRAIN_TEMPLATES, *HELD_OUT_TEMPLATES, *(t for group in TWO_OBJECT_TEMPLATES.values() for t in group),
                 SIDE_BY_SIDE_TEMPLATE, *(p for group in POSITION_PHRASES.values() for p in group),
                 *(p for group in RELATION_PHRASES.values() for p in group)]
    names = [*COLORS, *SHAPES, *SIZES, *(_tidy(f"a {color}") for color in COLORS)]  # "an orange"
    return frozenset(word for text in (*phrasings, *names) for word in words(re.sub(r"\{\w+\}", " ", text)))


def allowed_pairs(include_held_out: bool = False) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return pairs if include_held_out else [p for p in pairs if p not in HELD_OUT_PAIRS]


def single_object_scene(
    rng: random.Random,
    *,
    color=None,
    shape=None,
    position=None,
    size=None,
    state_position=None,
    state_size=None,
    template=None,
    include_held_out=False,
) -> Scene:
    """A one-object scene. Unset attributes are drawn from `rng`; unstated ones are still drawn."""
    if color is None or shape is None:
        if shape in EXTRA_SHAPES:  # any colour; never reached by random_scene, whose draws stay as they were
            pairs = [(c, shape) for c in COLORS if color in (None, c)]
        else:
            pairs = [p for p in allowed_pairs(include_held_out) if (color in (None, p[0]) and shape in (None, p[1]))]
        color, shape = rng.choice(pairs)
    position = position or rng.choice(list(POSITIONS))
    size = size or rng.choice(list(SIZES))
    state_position = rng.random() < 0.8 if state_position is None else state_position
    state_size = rng.random() < 0.5 if state_size is None else state_size
    cx, cy = POSITIONS[position]
    obj = ShapeObject(
        shape=shape,
        color=color,
        x=cx + rng.uniform(-0.04, 0.04),
        y=cy + rng.uniform(-0.04, 0.04),
        radius=SIZES[size] * rng.uniform(0.92, 1.08),
        position=position,
        size=size,
    )
    caption = single_caption(
        color, shape, position=position if state_position else None, size=size if state_size else None,
        template=template, rng=rng,
    )
    state_size = state_size and re.search(rf"\b{size}\b", caption) is not None  # some phrasings have no size slot
    stated = {"color", "shape"} | ({"position"} if state_position else set()) | ({"size"} if state_size else set())
    return Scene(objects=(obj,), caption=caption, background=_background(rng), stated=frozenset(stated))


def two_object_scene(rng: random.Random, *, a=None, b=None, relation=None, include_held_out=False, template=None) -> Scene:
    """Two non-overlapping objects and a caption naming both and, mostly, how they relate."""
    pairs = allowed_pairs(include_held_out)
    a = a or rng.choice(pairs)
    b = b or rng.choice([p for p in pairs if p != a])
    relation = relation or rng.choice(RELATIONS)
    layout = relation if relation != "and" else rng.choice(RELATIONS[:4])
    # centres far enough apart that two objects of the largest radius never touch
    near, far = rng.uniform(0.2, 0.3), rng.uniform(0.7, 0.8)
    across = (rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.62))
    first, second = (near, far) if layout in ("left of", "above") else (far, near)
    if layout in ("left of", "right of"):
        centres = ((first, across[0]), (second, across[1]))
    else:
        centres = ((across[0], first), (across[1], second))
    objects = tuple(
        ShapeObject(shape=s, color=c, x=x, y=y, radius=rng.uniform(*TWO_OBJECT_RADIUS))
        for (c, s), (x, y) in zip((a, b), centres)
    )
    caption = two_object_caption(a, b, relation, rng=rng, template=template)
    return Scene(objects=objects, caption=caption, relation=relation, background=_background(rng),
                 stated=frozenset({"color", "shape", "relation"}))


def random_scene(seed: int, *, two_object_fraction: float = 0.5, include_held_out: bool = False) -> Scene:
    """The training distribution: deterministic for a seed."""
    rng = random.Random(seed)
    if rng.random() < two_object_fraction:
        return two_object_scene(rng, include_held_out=include_held_out)
    return single_object_scene(rng, include_held_out=include_held_out)


def _background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(228, 246)
    return tuple(min(255, base + rng.randint(-3, 3)) for _ in range(3))


def _centred(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """`points` moved so that the polygon's area centroid is at the origin."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    n = len(points)
    cross = [xs[k] * ys[(k + 1) % n] - xs[(k + 1) % n] * ys[k] for k in range(n)]
    area = sum(cross) / 2
    gx = sum((xs[k] + xs[(k + 1) % n]) * cross[k] for k in range(n)) / (6 * area)
    gy = sum((ys[k] + ys[(k + 1) % n]) * cross[k] for k in range(n)) / (6 * area)
    return [(x - gx, y - gy) for x, y in points]


def _unit_heart(n: int = 64) -> list[tuple[float, float]]:
    """The classic heart curve (lobes up, point down), HEART_WIDTH half-wide at radius 1, its bounding
    box centred (centring its area centroid would push the point 1.34 r down)."""
    scale = HEART_WIDTH / 16
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))  # image y is down
        points.append((x * scale, y * scale))
    middle = (min(p[1] for p in points) + max(p[1] for p in points)) / 2
    return [(x, y - middle) for x, y in points]


def _unit_crescent(n: int = 48) -> list[tuple[float, float]]:
    """A disc of radius CRESCENT_OUTER minus one of radius CRESCENT_CUT shifted right: horns point right.
    Outer arc from the upper horn round the left to the lower horn, then the inner arc back."""
    big, cut, shift = CRESCENT_OUTER, CRESCENT_CUT, CRESCENT_SHIFT
    hx = (big * big - cut * cut + shift * shift) / (2 * shift)  # where the two circles cross
    hy = math.sqrt(big * big - hx * hx)
    outer_a = math.atan2(-hy, hx)  # upper horn (image y is down), going the long way round the left
    inner_a = math.atan2(-hy, hx - shift)
    outer = [(big * math.cos(a), big * math.sin(a))
             for a in (outer_a - (2 * math.pi + 2 * outer_a) * k / n for k in range(n + 1))]
    inner = [(shift + cut * math.cos(a), cut * math.sin(a))
             for a in (-inner_a + (2 * math.pi + 2 * inner_a) * k / n for k in range(1, n))]
    return _centred(outer + inner)


UNIT_POLYGONS = {  # outlines at radius 1, centred on their area centroid (the heart on its bounding box)
    "heart": _unit_heart(),
    "crescent": _unit_crescent(),
    "cross": [(x * CROSS_HALF_WIDTH + u * CROSS_ARM, y * CROSS_HALF_WIDTH + v * CROSS_ARM)  # 12 corners, clockwise
              for x, y, u, v in ((-1, 0, 0, -1), (1, 0, 0, -1), (1, -1, 0, 0), (0, -1, 1, 0), (0, 1, 1, 0),
                                 (1, 1, 0, 0), (1, 0, 0, 1), (-1, 0, 0, 1), (-1, 1, 0, 0), (0, 1, -1, 0),
                                 (0, -1, -1, 0), (-1, -1, 0, 0))],
    "diamond": [(0.0, -DIAMOND_HALF_HEIGHT), (DIAMOND_HALF_WIDTH, 0.0), (0.0, DIAMOND_HALF_HEIGHT),
                (-DIAMOND_HALF_WIDTH, 0.0)],
}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The outline of a shape drawn as one filled polygon; None for the circle and the ring."""
    if shape == "square":
        h = r * 0.886  # same area as the circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        t = r * 1.2  # circumradius; the bounding box is centred on (cx, cy)
        return [(cx, cy - 0.75 * t), (cx + t * 0.866, cy + 0.75 * t), (cx - t * 0.866, cy + 0.75 * t)]
    if shape == "star":  # five points, one pointing up; its area centroid is (cx, cy)
        radii = (r * STAR_OUTER, r * STAR_OUTER * STAR_INNER)  # tips at even k, notches at odd k
        return [(cx + radii[k % 2] * math.sin(math.pi * k / 5), cy - radii[k % 2] * math.cos(math.pi * k / 5))
                for k in range(10)]
    if shape in UNIT_POLYGONS:
        return [(cx + x * r, cy + y * r) for x, y in UNIT_POLYGONS[shape]]
    return None


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[str, list, bool]]:
    """How to draw a shape: parts ("polygon", points) or ("ellipse", [x0, y0, x1, y1]), each filled
    (True) or cut out (False), in order. A cut lies inside the parts filled before it."""
    if shape == "ring":
        outer, inner = r * RING_OUTER, r * RING_OUTER * RING_INNER
        return [("ellipse", [cx - outer, cy - outer, cx + outer, cy + outer], True),
                ("ellipse", [cx - inner, cy - inner, cx + inner, cy + inner], False)]
    points = _polygon(shape, cx, cy, r)
    if points is None:
        if shape != "circle":
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES + EXTRA_SHAPES)}")
        return [("ellipse", [cx - r, cy - r, cx + r, cy + r], True)]
    return [("polygon", points, True)]


def draw_outline(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, cut=0, *,
                 parts=None) -> None:
    """Draw `shape` with `fill` and its cut-outs with `cut`, as on a mask ("L", 255 and 0)."""
    for kind, geometry, filled in parts or _outline(shape, cx, cy, r):
        (draw.polygon if kind == "polygon" else draw.ellipse)(geometry, fill=fill if filled else cut)


def extent(shape: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of a shape drawn at (cx, cy) with radius r."""
    xs, ys = [], []
    for kind, geometry, filled in _outline(shape, cx, cy, r):
        if filled:
            xs += [p[0] for p in geometry] if kind == "polygon" else [geometry[0], geometry[2]]
            ys += [p[1] for p in geometry] if kind == "polygon" else [geometry[1], geometry[3]]
    return min(xs), min(ys), max(xs), max(ys)


def render(scene: Scene, size: int = 32, *, supersample: int = 4, color_jitter: int = 0, seed: int = 0,
           height: int | None = None) -> Image.Image:
    """Draw a scene as an RGB image of `size`×`size` (or `size`×`height`), antialiased by supersampling.

    On a canvas that is not square, positions stay fractions of the width and the height, and a radius is a
    fraction of the side of the square of the same area, so a shape keeps its own proportions and its size in
    pixels whatever the canvas's aspect (aspect-ratio buckets train on such images: benchmarks/lora_buckets.py)."""
    rng = random.Random(seed)
    height = size if height is None else height
    wide, tall = size * supersample, height * supersample
    side = wide if wide == tall else math.sqrt(wide * tall)
    image = Image.new("RGB", (wide, tall), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        rgb = tuple(max(0, min(255, v + rng.randint(-color_jitter, color_jitter))) for v in COLORS[obj.color])
        cx, cy, r = obj.x * wide, obj.y * tall, obj.radius * side
        parts = _outline(obj.shape, cx, cy, r)
        if all(filled for _, _, filled in parts):
            draw_outline(draw, obj.shape, cx, cy, r, rgb, parts=parts)
        else:  # cut-outs go through a mask, so they leave what lies beneath rather than paint the background
            mask = Image.new("L", image.size, 0)
            draw_outline(ImageDraw.Draw(mask), obj.shape, cx, cy, r, 255, parts=parts)
            image.paste(rgb, (0, 0, wide, tall), mask)
    return image.resize((size, height), Image.Resampling.BOX)
