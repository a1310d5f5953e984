"""The judge: read a shapes-world image back into its objects, and score it against a prompt.

Generated images are imperfect (soft edges, noise, a tinted background), so every step works
with tolerances rather than exact colours:

1. the background is the median of the border pixels;
2. foreground pixels are far from the background and saturated; connected components of them,
   minus specks, are the objects (touching objects of different colours are split by hue);
3. each object gets a soft coverage mask (how much of each pixel it covers), from which come its
   area and centroid;
4. colour is the nearest palette hue of its most saturated pixels, which survives washed-out or
   darkened colours because mixing with grey keeps the hue;
5. shape is found by analysis by synthesis: each candidate outline, drawn the way
   `shapes.render` draws it with the measured area and centroid, is compared with the soft mask
   and the closest wins. At 32x32 a small object is about 7 pixels across, too few for a
   bounding-box fill ratio to tell a circle from a square reliably. The candidates are
   `shapes.SHAPES` plus `shapes.EXTRA_SHAPES` (star, heart, cross, ring, crescent, diamond, which
   only a LoRA teaches), or the shapes a caller names (`judge(image, candidates=...)`): a badly
   drawn star may sit closer to the cross than to the star, so with every shape in play it is
   read as a cross, with only the base shapes and the star as a star;
6. position, size and relation follow from the fitted centre and radius.

`score_single` and `score_two` then compare a `Judgement` with a `Spec`, what the prompt asked for.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from genkit.data import shapes

MIN_AREA = 0.01  # components smaller than this fraction of the image are specks (a small object is ~0.035)
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background (0-255); palette colours sit 210-300 away
FOREGROUND_CHROMA = 40.0  # max-min of RGB; the background has < 10, palette colours > 150
SPLIT_HUE_GAP = 14.0  # degrees; orange and yellow, the closest palette hues, are 20 apart
SPLIT_GAIN = 0.1  # how much better (in shape fit) touching objects must be explained as two than as one
SUPERSAMPLE = 4  # as shapes.render, so fitted outlines are antialiased the same way


def _hue(pixels) -> np.ndarray:
    """Hue angle in degrees of the chroma part of RGB colours, (..., 3) -> (...).

    Adding grey or scaling keeps it, so washed-out and darkened colours keep their hue."""
    pixels = np.asarray(pixels, dtype=np.float64)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return np.degrees(np.arctan2(math.sqrt(3) / 2 * (g - b), r - (g + b) / 2)) % 360


PALETTE_HUES = {name: float(_hue(rgb)) for name, rgb in shapes.COLORS.items()}


def _unit_outline(shape: str) -> tuple[float, tuple[float, float]]:
    """Area and area-centroid offset of `shape` drawn with radius 1 at the origin by shapes.render:
    the filled parts of its outline minus its cut-outs (which lie inside them)."""
    total, moment_x, moment_y = 0.0, 0.0, 0.0
    for kind, geometry, filled in shapes._outline(shape, 0.0, 0.0, 1.0):  # the renderer's own outlines
        if kind == "polygon":
            xs, ys = np.array([p[0] for p in geometry]), np.array([p[1] for p in geometry])
            cross = xs * np.roll(ys, -1) - np.roll(xs, -1) * ys
            area = cross.sum() / 2
            cx = ((xs + np.roll(xs, -1)) * cross).sum() / (6 * area)
            cy = ((ys + np.roll(ys, -1)) * cross).sum() / (6 * area)
            area = abs(area)
        else:
            x0, y0, x1, y1 = geometry
            area, cx, cy = math.pi * (x1 - x0) * (y1 - y0) / 4, (x0 + x1) / 2, (y0 + y1) / 2
        sign = 1 if filled else -1
        total, moment_x, moment_y = total + sign * area, moment_x + sign * area * cx, moment_y + sign * area * cy
    return total, (moment_x / total, moment_y / total)


CANDIDATE_SHAPES = shapes.SHAPES + shapes.EXTRA_SHAPES  # every outline the renderer can draw
UNIT_OUTLINES = {shape: _unit_outline(shape) for shape in CANDIDATE_SHAPES}


@dataclass(frozen=True)
class JudgedObject:
    """One object read from an image. Coordinates are fractions of (width, height), as in shapes.py."""

    color: str
    shape: str
    position: str  # nearest named anchor in shapes.POSITIONS
    size: str  # nearest named size in shapes.SIZES
    center: tuple[float, float]  # centre of the fitted outline, where shapes.render puts (x, y)
    centroid: tuple[float, float]  # centre of mass of the coverage mask
    area: float  # fraction of the image covered
    radius: float  # radius of the fitted outline, fraction of the width
    rgb: tuple[int, int, int]  # median of the most saturated pixels
    shape_fit: float  # 1 = the mask is exactly the fitted outline, 0 = no overlap


@dataclass(frozen=True)
class Judgement:
    objects: tuple[JudgedObject, ...]  # largest first
    background: tuple[int, int, int]
    width: int

    @property
    def count(self) -> int:
        return len(self.objects)

    def find(self, color: str, shape: str) -> list[JudgedObject]:
        return [o for o in self.objects if o.color == color and o.shape == shape]

    def relation(self, a: int = 0, b: int = 1) -> str:
        """How object `a` relates to object `b` (indices into `objects`)."""
        return relation_between(self.objects[a], self.objects[b])


def relation_between(a: JudgedObject, b: JudgedObject) -> str:
    """'left of', 'right of', 'above' or 'below': the dominant axis of the centre difference."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def judge(image: Image.Image, *, min_area: float = MIN_AREA, candidates=None) -> Judgement:
    """Read `image` (RGB, square, any size) into its objects. `candidates`: the shapes an object may
    be read as (default every shape the renderer draws, `CANDIDATE_SHAPES`)."""
    candidates = CANDIDATE_SHAPES if candidates is None else tuple(candidates)
    for shape in candidates:
        _check(shape, CANDIDATE_SHAPES, "shape")
    if not candidates:
        raise ValueError("candidates is empty; give at least one shape")
    # 1. Pixels and background
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (height, width, 3)
    height, width = pixels.shape[:2]
    if height != width:
        raise ValueError(f"judge expects a square image, got {width}x{height}")
    background = _estimate_background(pixels)
    # 2. Foreground components
    labels = _label(_foreground(pixels, background))
    # 3. Read each component as one object, or as several where differently coloured objects touch
    objects = []
    for index in range(1, labels.max() + 1):
        component = labels == index
        if component.sum() < min_area * width * width / 4:
            continue  # a speck even with its faint edges added; skipping it keeps noisy images fast
        free = (labels == 0) | component  # coverage may spread into the background, not into others
        objects += _read_component(pixels, background, component, free, min_area * width * width, candidates)
    # 4. Drop specks
    objects = [o for o in objects if o.area >= min_area]
    objects.sort(key=lambda o: o.area, reverse=True)
    return Judgement(objects=tuple(objects), background=tuple(int(round(v)) for v in background), width=width)


def _estimate_background(pixels: np.ndarray) -> np.ndarray:
    """Median of a border ring: objects rarely reach the border, and the median ignores those that do."""
    ring = max(1, pixels.shape[0] // 32)
    border = np.concatenate([
        pixels[:ring].reshape(-1, 3), pixels[-ring:].reshape(-1, 3),
        pixels[:, :ring].reshape(-1, 3), pixels[:, -ring:].reshape(-1, 3),
    ])
    return np.median(border, axis=0)


def _foreground(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    distance = np.linalg.norm(pixels - background, axis=-1)
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    return (distance > FOREGROUND_DISTANCE) & (chroma > FOREGROUND_CHROMA)


def _label(mask: np.ndarray) -> np.ndarray:
    """8-connected components of `mask`: 0 is background, components are 1..n."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny in range(max(0, y - 1), min(height, y + 2)):
                for nx in range(max(0, x - 1), min(width, x + 2)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
    return labels


def _read_component(pixels, background, component, free, min_pixels, candidates) -> list[JudgedObject]:
    """One object, unless splitting the component by hue gives parts whose fitted outlines explain
    the pixels clearly better (`SPLIT_GAIN`): then each part. Judging the split by the fit, not by
    the hues alone, keeps a noisy object whose colour lies between two palette hues in one piece."""
    whole = _measure(pixels, background, component, free, candidates)
    parts = [
        _measure(pixels, background, part, free & ~(component & ~part), candidates)
        for part in _split_by_hue(pixels, component, min_pixels)
    ]
    parts = [p for p in parts if p.area * pixels.shape[0] * pixels.shape[1] >= min_pixels]
    if len(parts) < 2:
        return [whole]
    split_fit = sum(p.shape_fit * p.area for p in parts) / sum(p.area for p in parts)
    return parts if split_fit >= whole.shape_fit + SPLIT_GAIN else [whole]


def _split_by_hue(pixels: np.ndarray, component: np.ndarray, min_pixels: float) -> list[np.ndarray]:
    """The connected pieces of `component` after giving each pixel to its nearest hue group;
    empty when only one group holds `min_pixels` saturated pixels."""
    hues = _hue(pixels)
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    centres = _hue_groups(hues[component & (chroma >= 0.6 * chroma[component].max())], min_pixels)
    if len(centres) < 2:
        return []
    nearest = np.argmin(_hue_gap(hues[..., None], np.array(centres)), axis=-1)
    pieces = []
    for k in range(len(centres)):
        labels = _label(component & (nearest == k))
        pieces += [labels == i for i in range(1, labels.max() + 1)]
    return pieces


def _hue_groups(core_hues: np.ndarray, min_pixels: float) -> list[float]:
    """Median hues of the palette-colour groups among `core_hues` big and distinct enough to be objects."""
    palette = np.array(list(PALETTE_HUES.values()))
    nearest = np.argmin(_hue_gap(core_hues[:, None], palette), axis=-1)
    votes = np.bincount(nearest, minlength=len(palette))
    centres = []
    for k in np.argsort(-votes):
        if votes[k] < min_pixels:
            break
        group = core_hues[nearest == k]
        centre = (palette[k] + np.median(((group - palette[k] + 180) % 360) - 180)) % 360
        if all(_hue_gap(centre, c) >= SPLIT_HUE_GAP for c in centres):
            centres.append(centre)
    return centres


def _hue_gap(a, b):
    """Angular distance between hues, in degrees."""
    gap = np.abs(np.asarray(a) - np.asarray(b)) % 360
    return np.minimum(gap, 360 - gap)


def _measure(pixels, background, component, free, candidates) -> JudgedObject:
    """Colour, coverage, shape, position and size of the object whose pixels are `component`."""
    rgb = _component_color(pixels, background, component)
    coverage = _coverage(pixels, background, rgb, component, free)
    area = max(coverage.sum(), 1e-6)
    width = pixels.shape[1]
    ys, xs = np.mgrid[0 : pixels.shape[0], 0 : width] + 0.5  # pixel centres
    centroid = ((coverage * xs).sum() / area, (coverage * ys).sum() / area)
    shape, radius, center, fit = _fit_shape(coverage, area, centroid, candidates)
    center_frac = (center[0] / width, center[1] / pixels.shape[0])
    return JudgedObject(
        color=_nearest_color(rgb),
        shape=shape,
        position=_nearest_position(center_frac),
        size=_nearest_size(radius / width),
        center=center_frac,
        centroid=(centroid[0] / width, centroid[1] / pixels.shape[0]),
        area=float(area / (width * pixels.shape[0])),
        radius=radius / width,
        rgb=tuple(int(round(v)) for v in rgb),
        shape_fit=fit,
    )


def _component_color(pixels, background, component) -> np.ndarray:
    """Median of the half of the component farthest from the background: the object's own colour."""
    values = pixels[component]
    distance = np.linalg.norm(values - background, axis=-1)
    core = values[distance >= np.median(distance)]
    return np.median(core, axis=0)


def _coverage(pixels, background, rgb, component, free) -> np.ndarray:
    """Soft mask: the fraction of each pixel the object covers, from where the pixel lies between
    the background and the object's colour. Taken over the component grown by one pixel, so faint
    antialiased edges count, but only where `free` (never over another object)."""
    grown = component.copy()
    grown[1:] |= component[:-1]
    grown[:-1] |= component[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    grown &= free
    direction = rgb - background
    alpha = ((pixels - background) @ direction) / (direction @ direction)
    return np.where(grown, np.clip(alpha, 0.0, 1.0), 0.0)


def _fit_shape(coverage, area, centroid, candidates):
    """The candidate outline closest to the coverage mask: (shape, radius px, centre px, fit)."""
    box = _crop_box(coverage)
    mask = coverage[box[1] : box[3], box[0] : box[2]]
    best = None
    for shape in candidates:
        radius, center, template = _matched_template(shape, area, centroid, box)
        error = np.abs(mask - template).sum()
        if best is None or error < best[0]:
            best = (error, shape, radius, center)
    error, shape, radius, center = best
    return shape, radius, center, float(max(0.0, 1 - error / (2 * area)))


def _crop_box(coverage, margin: int = 3) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(coverage)
    height, width = coverage.shape
    return (max(0, xs.min() - margin), max(0, ys.min() - margin),
            min(width, xs.max() + 1 + margin), min(height, ys.max() + 1 + margin))


def _matched_template(shape, area, centroid, box):
    """`shape` drawn with the given area and centroid, inside `box`; the radius is refined once
    because antialiasing makes drawn outlines slightly larger than their nominal area."""
    unit_area, (off_x, off_y) = UNIT_OUTLINES[shape]
    radius = math.sqrt(area / unit_area)
    for _ in range(2):
        center = (centroid[0] - off_x * radius, centroid[1] - off_y * radius)
        template = _draw(shape, center, radius, box)
        radius *= math.sqrt(area / max(template.sum(), 1e-6))
    center = (centroid[0] - off_x * radius, centroid[1] - off_y * radius)
    return radius, center, _draw(shape, center, radius, box)


def _draw(shape, center, radius, box) -> np.ndarray:
    """Coverage of `shape` at `center` (pixel units) over `box`, antialiased like shapes.render."""
    x0, y0, x1, y1 = box
    ss = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(canvas)
    # PIL puts big pixel k's centre at coordinate k, i.e. at (k + 0.5) / ss in small pixels
    cx, cy, r = (center[0] - x0) * ss - 0.5, (center[1] - y0) * ss - 0.5, radius * ss
    shapes.draw_outline(draw, shape, cx, cy, r, 255)
    small = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255


def _nearest_color(rgb) -> str:
    hue = float(_hue(rgb))
    return min(PALETTE_HUES, key=lambda name: _hue_gap(hue, PALETTE_HUES[name]))


def _nearest_position(center: tuple[float, float]) -> str:
    return min(shapes.POSITIONS, key=lambda n: math.dist(center, shapes.POSITIONS[n]))


def _nearest_size(radius: float) -> str:
    """Nearest by ratio, so the boundary between 0.11 and 0.18 sits at their geometric mean."""
    return min(shapes.SIZES, key=lambda n: abs(math.log(radius / shapes.SIZES[n])))


# ---------------------------------------------------------------------------------------------
# Scoring against what the prompt asked for


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    position: str | None = None  # None when the prompt does not name it
    size: str | None = None  # None when the prompt does not name it

    def __post_init__(self):
        _check(self.color, shapes.COLORS, "color")
        _check(self.shape, CANDIDATE_SHAPES, "shape")
        if self.position is not None:
            _check(self.position, shapes.POSITIONS, "position")
        if self.size is not None:
            _check(self.size, shapes.SIZES, "size")


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: one object, or two and how the first relates to the second."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # two objects only; "and" asks only that both are present

    def __post_init__(self):
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a Spec has one or two objects, got {len(self.objects)}")
        if (len(self.objects) == 2) != (self.relation is not None):
            raise ValueError("a relation is needed for two objects and only for two")
        if self.relation is not None:
            _check(self.relation, shapes.RELATIONS, "relation")

    @classmethod
    def from_scene(cls, scene: shapes.Scene) -> Spec:
        """The spec of a shapes scene, with position and size only where its caption names them."""
        if len(scene.objects) == 2:
            a, b = scene.objects
            return cls((ObjectSpec(a.color, a.shape), ObjectSpec(b.color, b.shape)), scene.relation)
        obj = scene.objects[0]
        # `stated` can claim a size that the chosen template has no slot for, so check the words
        size_named = "size" in scene.stated and re.search(rf"\b{obj.size}\b", scene.caption)
        position = obj.position if "position" in scene.stated else None
        return cls((ObjectSpec(obj.color, obj.shape, position, obj.size if size_named else None),))


def _check(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Score:
    """Which parts of a prompt an image got right; None where the prompt did not ask."""

    color: bool  # every requested object's colour
    shape: bool  # every requested object's shape
    position: bool | None  # single object with a stated position
    size: bool | None  # single object with a stated size
    both_present: bool | None  # two objects: both requested colour-shape pairs found
    relation: bool | None  # two objects with a spatial relation: found and placed right
    count: int  # objects found
    all_correct: bool


def score(judgement: Judgement, spec: Spec) -> Score:
    return score_single(judgement, spec) if len(spec.objects) == 1 else score_two(judgement, spec)


def score_single(judgement: Judgement, spec: Spec) -> Score:
    """All correct: exactly one object, of the right colour and shape, at the stated position.
    Size is reported but not part of all-correct."""
    want = spec.objects[0]
    if judgement.count == 0:
        return Score(color=False, shape=False, position=_stated(want.position, False), size=_stated(want.size, False),
                     both_present=None, relation=None, count=0, all_correct=False)
    obj = judgement.objects[0]
    color, shape = obj.color == want.color, obj.shape == want.shape
    position = _stated(want.position, obj.position == want.position)
    size = _stated(want.size, obj.size == want.size)
    all_correct = judgement.count == 1 and color and shape and position is not False
    return Score(color=color, shape=shape, position=position, size=size, both_present=None, relation=None,
                 count=judgement.count, all_correct=all_correct)


def _stated(wanted, right: bool) -> bool | None:
    return None if wanted is None else right


def score_two(judgement: Judgement, spec: Spec) -> Score:
    """All correct: both requested objects present (any others are ignored) and, for a spatial
    relation, the first placed relative to the second as asked."""
    want_a, want_b = spec.objects
    a, b = _assign(judgement.objects, want_a, want_b)
    color = a is not None and b is not None and a.color == want_a.color and b.color == want_b.color
    shape = a is not None and b is not None and a.shape == want_a.shape and b.shape == want_b.shape
    both = color and shape
    relation = None if spec.relation == "and" else both and relation_between(a, b) == spec.relation
    return Score(color=color, shape=shape, position=None, size=None, both_present=both, relation=relation,
                 count=judgement.count, all_correct=both and relation is not False)


def _assign(objects, want_a: ObjectSpec, want_b: ObjectSpec):
    """The two distinct found objects that best match (want_a, want_b), None where there are too
    few; larger objects win ties, as `objects` comes largest first."""
    options = list(objects) + [None, None]
    best, best_key = (None, None), None
    for i, oi in enumerate(options):
        for j, oj in enumerate(options):
            key = (_match(oi, want_a) + _match(oj, want_b), -(i + j))
            if i != j and (best_key is None or key > best_key):
                best, best_key = (oi, oj), key
    return best


def _match(obj: JudgedObject | None, want: ObjectSpec) -> int:
    """3 for colour and shape, 1 for colour or shape alone, so a full match beats two halves."""
    if obj is None:
        return 0
    color, shape = obj.color == want.color, obj.shape == want.shape
    return 3 if color and shape else int(color or shape)
