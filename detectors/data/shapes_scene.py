"""The shapes dataset's images: where each shape goes (geometry) and how the image looks (appearance).

``draw_scene`` makes one image: up to ``MAX_OBJECTS`` rectangles, ellipses and triangles, randomly sized,
stretched, rotated and placed, painted back to front over a gradient with blobs, lines and noise. Later
objects occlude earlier ones; a placement that would leave an earlier object with less than half of its
pixels visible is rejected, and a forced "anchor" object (of a given class and COCO area range) is never
occluded.

Geometry (the masks, hence every box and area written) draws only uniform numbers from its own
``numpy.random.default_rng`` and uses correctly rounded IEEE arithmetic (+ - * / sqrt): no trigonometry,
log or exp, whose last bit depends on the C library. It is therefore identical on every machine for a
given numpy release line. Colours and noise come from a second generator, so the geometry never depends
on how many colour draws were made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES_CATEGORIES: list[dict] = [
    {"id": 1, "name": "rectangle"},
    {"id": 3, "name": "ellipse"},
    {"id": 7, "name": "triangle"},
]
KINDS = [c["name"] for c in SHAPES_CATEGORIES]
SIZES = ("small", "medium", "large")
SMALL_MAX, LARGE_MIN = 32 * 32, 96 * 96  # COCO area ranges (pycocotools' areaRng)
MIN_VISIBLE = 0.5
MAX_OBJECTS = 6

# Full-shape area ranges (pixels) for the random objects and, tighter, for the forced anchors. Anchor
# ranges keep clear of the COCO thresholds after rasterisation; anchors are never occluded.
_AREA = {"small": (64.0, 1000.0), "medium": (1100.0, 9000.0), "large": (9600.0, None)}
_ANCHOR_AREA = {"small": (300.0, 900.0), "medium": (2500.0, 6000.0), "large": (9800.0, 11500.0)}
_ANCHOR_IN_RANGE = {
    "small": lambda a: 0 < a < SMALL_MAX,
    "medium": lambda a: SMALL_MAX < a < LARGE_MIN,
    "large": lambda a: a > LARGE_MIN,
}
_SIZE_PROBS = (("small", 0.45), ("medium", 0.4), ("large", 0.15))


@dataclass
class Shape:
    """One placed object."""

    kind: str  # a SHAPES_CATEGORIES name
    mask: np.ndarray  # bool[H, W], the full (unoccluded) shape
    full_area: int  # pixels in ``mask``
    min_visible: int  # later placements may not push the visible pixel count below this


def draw_scene(
    seed: int, split_code: int, index: int, hw: tuple[int, int], empty: bool, anchor: tuple[str, str] | None
) -> tuple[list[Shape], np.ndarray]:
    """Image ``index`` of a split: its shapes back to front and its pixels, uint8[H, W, 3] RGB.

    ``anchor`` = (kind, size) forces a never-occluded first shape of that class and COCO area range;
    ``empty`` gives an image without shapes.
    """
    # One generator per image and purpose: geometry never depends on how many colour draws were made.
    geometry = np.random.default_rng([seed, split_code, index, 0])
    look = np.random.default_rng([seed, split_code, index, 1])
    n_objects = 0 if empty else 1 + int(geometry.random() * MAX_OBJECTS)
    shapes = _layout(geometry, hw, n_objects, anchor)
    return shapes, _render(look, hw, shapes)


def visible_masks(shapes: list[Shape]) -> list[np.ndarray]:
    """The part of each shape that shows (bool[H, W] each, same order): later shapes lie on top."""
    if not shapes:
        return []
    covered = np.zeros_like(shapes[0].mask)
    visible = []
    for shape in reversed(shapes):
        visible.append(shape.mask & ~covered)
        covered |= shape.mask
    return visible[::-1]


# ----------------------------------------------------------------------------------------------- geometry
def _rotation(rng: np.random.Generator, kind: str) -> tuple[float, float]:
    """(cos, sin) of a random angle from a tangent and a quarter turn: no trig: bit-identical everywhere."""
    if kind == "rectangle":
        if rng.random() < 0.5:
            return 1.0, 0.0
        tangent, quarters = rng.uniform(-0.5, 0.5), 0  # at most ~27 degrees: still clearly a rectangle
    else:
        tangent, quarters = rng.uniform(-1.0, 1.0), int(rng.random() * 4)
    c = 1.0 / math.sqrt(1.0 + tangent * tangent)
    s = tangent * c
    for _ in range(quarters):
        c, s = -s, c
    return c, s


def _skewed(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A value in [lo, hi] skewed towards lo (like a log-uniform draw, but without libm's log/exp)."""
    u = rng.random()
    return lo + (hi - lo) * u * u


def _aspect(rng: np.random.Generator, max_ratio: float) -> float:
    """Width/height ratio in [1/max_ratio, max_ratio], as often wide as tall."""
    ratio = 1.0 + (max_ratio - 1.0) * rng.random()
    return ratio if rng.random() < 0.5 else 1.0 / ratio


@dataclass
class _Outline:
    """A rotated shape centred on (0, 0): an ellipse (semi-axes ``a``, ``b``) or a polygon (``verts``)."""

    kind: str
    cos: float
    sin: float
    a: float = 0.0
    b: float = 0.0
    verts: list[tuple[float, float]] | None = None

    def extent(self) -> tuple[float, float, float, float]:
        """lo_x, hi_x, lo_y, hi_y of the outline."""
        if self.verts is None:
            c, s, a, b = self.cos, self.sin, self.a, self.b
            ex, ey = math.sqrt(a * a * c * c + b * b * s * s), math.sqrt(a * a * s * s + b * b * c * c)
            return -ex, ex, -ey, ey
        xs, ys = [v[0] for v in self.verts], [v[1] for v in self.verts]
        return min(xs), max(xs), min(ys), max(ys)

    def inside(self, cx: float, cy: float, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """bool[len(py), len(px)]: which points (px[j], py[i]) lie inside the outline centred on (cx, cy)."""
        if self.verts is None:
            c, s, a, b = self.cos, self.sin, self.a, self.b
            dx, dy = px - cx, py - cy
            u, v = c * dx + s * dy, c * dy - s * dx
            return u * u * (b * b) + v * v * (a * a) <= (a * a) * (b * b)
        pts = [(cx + x, cy + y) for x, y in self.verts]
        edges = list(zip(pts, pts[1:] + pts[:1], strict=True))
        orientation = 0.0
        for (xa, ya), (xb, yb) in edges:
            orientation += xa * yb - xb * ya
        inside = np.ones((py.shape[0], px.shape[1]), dtype=bool)
        for (xa, ya), (xb, yb) in edges:
            cross = (xb - xa) * (py - ya) - (yb - ya) * (px - xa)
            inside &= cross >= 0 if orientation > 0 else cross <= 0
        return inside


def _random_outline(rng: np.random.Generator, kind: str, area: float, aspect: float) -> _Outline:
    """A randomly rotated ``kind`` of the given area and width/height ``aspect``."""
    box_area = {"rectangle": area, "triangle": 2.0 * area, "ellipse": 4.0 * area / math.pi}[kind]
    h = math.sqrt(box_area / aspect)
    w = aspect * h
    c, s = _rotation(rng, kind)
    if kind == "ellipse":
        return _Outline(kind, c, s, a=w / 2.0, b=h / 2.0)
    if kind == "rectangle":
        local = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    else:  # apex somewhere along the top edge of the w x h box, base along the bottom edge
        local = [(w * rng.uniform(0.15, 0.85) - w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return _Outline(kind, c, s, verts=[(c * x - s * y, s * x + c * y) for x, y in local])


def _sample_shape(rng: np.random.Generator, kind: str, area: float, aspect: float, hw: tuple[int, int]):
    """Rasterise one randomly rotated and placed shape: its bool[H, W] mask, or None if it does not fit.

    A pixel belongs to the shape when its centre (x + 0.5, y + 0.5) lies inside the outline.
    """
    height, width = hw
    outline = _random_outline(rng, kind, area, aspect)
    lo_x, hi_x, lo_y, hi_y = outline.extent()
    if hi_x - lo_x > width - 1 or hi_y - lo_y > height - 1:
        return None
    cx = -lo_x + rng.random() * (width - (hi_x - lo_x))
    cy = -lo_y + rng.random() * (height - (hi_y - lo_y))
    x0, x1 = max(0, math.floor(cx + lo_x)), min(width, math.ceil(cx + hi_x) + 1)
    y0, y1 = max(0, math.floor(cy + lo_y)), min(height, math.ceil(cy + hi_y) + 1)
    px = (np.arange(x0, x1, dtype=np.float64) + 0.5)[None, :]
    py = (np.arange(y0, y1, dtype=np.float64) + 0.5)[:, None]
    mask = np.zeros(hw, dtype=bool)
    mask[y0:y1, x0:x1] = outline.inside(cx, cy, px, py)
    return mask


class _Canvas:
    """The shapes placed so far, back to front, and which of them shows at each pixel."""

    def __init__(self, hw: tuple[int, int]):
        self.hw = hw
        self.shapes: list[Shape] = []
        self.owner = np.full(hw, -1, dtype=np.int16)  # index of the shape that shows at each pixel
        self.visible: list[int] = []  # visible pixels of each shape

    def try_place(self, rng, kind: str, area: float, aspect: float, tries: int, accept_area, protected: bool):
        """Up to ``tries`` random rotations and positions; True once one is placed on top.

        A placement is refused when ``accept_area(pixels)`` is false or it would hide too much of an earlier
        shape; a ``protected`` shape may never lose a pixel.
        """
        for _ in range(tries):
            mask = _sample_shape(rng, kind, area, aspect, self.hw)
            if mask is None:
                continue
            full = int(mask.sum())
            if not accept_area(full):
                continue
            under = self.owner[mask]
            lost = np.bincount(under[under >= 0], minlength=len(self.shapes))
            if any(self.visible[k] - lost[k] < shape.min_visible for k, shape in enumerate(self.shapes)):
                continue
            for k in range(len(self.shapes)):
                self.visible[k] -= int(lost[k])
            self.owner[mask] = len(self.shapes)
            min_visible = full if protected else max(1, math.ceil(MIN_VISIBLE * full))
            self.shapes.append(Shape(kind, mask, full, min_visible))
            self.visible.append(full)
            return True
        return False


def _random_size(rng: np.random.Generator) -> str:
    r = rng.random()
    for name, p in _SIZE_PROBS:
        if r < p:
            return name
        r -= p
    return "large"


def _layout(rng: np.random.Generator, hw: tuple[int, int], n_objects: int, anchor) -> list[Shape]:
    """Place up to ``n_objects`` shapes back to front; ``anchor`` = (kind, size) is a protected first one."""
    height, width = hw
    canvas = _Canvas(hw)
    if anchor is not None:
        kind, size = anchor
        lo, hi = _ANCHOR_AREA[size]
        for _ in range(50):  # each round: fresh area/aspect, then 20 rotations/positions
            area, aspect = _skewed(rng, lo, hi), _aspect(rng, 1.35)
            if canvas.try_place(rng, kind, area, aspect, 20, _ANCHOR_IN_RANGE[size], protected=True):
                break
        else:
            raise RuntimeError(f"could not place a {size} {kind} in a {height}x{width} image")
    large_hi = max(12000.0, 0.4 * height * width)
    while len(canvas.shapes) < n_objects:
        kind = KINDS[int(rng.random() * len(KINDS))]
        lo, hi = _AREA[_random_size(rng)]
        area = _skewed(rng, lo, hi if hi is not None else large_hi)
        if not canvas.try_place(rng, kind, area, _aspect(rng, 2.0), 30, lambda a: a >= 30, protected=False):
            n_objects -= 1  # the image is too crowded for this one: skip it
    return canvas.shapes


# --------------------------------------------------------------------------------------------- appearance
def _window(cx: float, cy: float, radius: float, hw: tuple[int, int]) -> tuple[slice, slice]:
    """Row/column slices of the pixels within ``radius`` of (cx, cy), clipped to the image."""
    return (
        slice(max(0, int(cy - radius)), max(0, min(hw[0], int(cy + radius) + 2))),
        slice(max(0, int(cx - radius)), max(0, min(hw[1], int(cx + radius) + 2))),
    )


def _background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """float32[H, W, 3]: a gradient with blobs and lines, clutter that is none of the classes."""
    hw = xs.shape
    height, width = hw
    # Smooth two-colour gradient along a random direction.
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    d = rng.normal(size=2).astype(np.float32)
    t = xs * d[0] + ys * d[1]
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 + t[..., None] * (c1 - c0)
    # Soft blobs: Gaussian bumps without edges, so they never look like one of the classes.
    for _ in range(int(rng.integers(0, 4))):
        cx, cy, sigma = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 25)
        win = _window(cx, cy, 3 * sigma, hw)
        bump = np.exp(-((xs[win] - cx) ** 2 + (ys[win] - cy) ** 2) / (2 * sigma * sigma))
        img[win] += bump[..., None] * rng.uniform(-60, 60, 3).astype(np.float32)
    # Thin straight lines (1-3 px): clutter with edges that is not an object.
    for _ in range(int(rng.integers(0, 4))):
        (ax, ay), (bx, by) = rng.uniform(0, 1, (2, 2)) * (width, height)
        vx, vy = bx - ax, by - ay
        win = _window((ax + bx) / 2, (ay + by) / 2, math.hypot(vx, vy) / 2 + 2, hw)
        x, y = xs[win], ys[win]
        u = np.clip(((x - ax) * vx + (y - ay) * vy) / max(vx * vx + vy * vy, 1e-6), 0, 1)
        dist = np.hypot(x - ax - u * vx, y - ay - u * vy)
        img[win][dist <= rng.uniform(0.5, 1.5)] = rng.uniform(0, 255, 3)
    return img


def _paint(rng: np.random.Generator, img: np.ndarray, shapes: list[Shape]) -> None:
    """Paint ``shapes`` back to front into ``img``, each in a colour that stands out from what it covers."""
    painted: list[np.ndarray] = []
    for shape in shapes:
        rows, cols = np.nonzero(shape.mask)
        # Pick the candidate colour farthest from what lies underneath (background and earlier objects).
        under = [img[rows, cols].mean(axis=0)]
        under += [col for s, col in zip(shapes, painted, strict=False) if s.mask[rows, cols].any()]
        candidates = rng.uniform(0, 255, (24, 3)).astype(np.float32)
        score = np.min([np.linalg.norm(candidates - u, axis=1) for u in under], axis=0)
        colour = candidates[int(np.argmax(score))]
        painted.append(colour)
        # A gentle linear shading across the object so fills are not perfectly flat.
        g = rng.uniform(-0.25, 0.25, 2).astype(np.float32)
        shade = (cols - cols.mean()) * g[0] + (rows - rows.mean()) * g[1]
        img[rows, cols] = colour + shade[:, None]


def _render(rng: np.random.Generator, hw: tuple[int, int], shapes: list[Shape]) -> np.ndarray:
    """Paint background, distractors and shapes (back to front); returns uint8[H, W, 3] RGB."""
    ys, xs = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    img = _background(rng, xs, ys)
    _paint(rng, img, shapes)
    # Sensor-like noise; uniform rather than Gaussian because it is 3x cheaper to draw (std 2..7 levels).
    img += (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(rng.uniform(7.0, 24.0))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
