"""Synthetic "shapes" detection dataset: a small, deterministic stand-in for COCO that builds in seconds.

Layout written under ``out`` (every box below is integer-aligned, so all layouts round-trip exactly)::

    images/{train,val}/000001.jpg             image ids are unique across both splits
    annotations/instances_{train,val}.json    COCO: bbox [x, y, w, h] of the VISIBLE mask, RLE segmentation
    voc/JPEGImages/000001.jpg                 (voc=True) Pascal VOC copy of the same images
    voc/Annotations/000001.xml                1-based VOC boxes: xmin = x + 1, ymin = y + 1, xmax = x + w, ymax = y + h
    voc/ImageSets/Main/{train,val,trainval}.txt
    classification/{train,val}/<class>/*.png  (classification=True) crops of the visible boxes plus a margin
    shapes.json                               manifest: generation parameters and counts

Classes use non-contiguous COCO ids (rectangle=1, ellipse=3, triangle=7) so readers must map ids to
contiguous labels. Later objects occlude earlier ones; a placement that would leave an earlier object with
less than half of its pixels visible is rejected. Each split with >= 4 images is guaranteed to contain all
three classes, objects in all three COCO area ranges (small < 32**2 <= medium < 96**2 < large) and at least
one image without objects: images 0..2 of a split each hold one never-occluded "anchor" object of a forced
size, and ~5% of the other images are empty.

VOC ``difficult`` rule: an object is difficult when less than 60% of its pixels are visible or its visible
box is narrower than 8 px on either side (exactly the objects too small to get a classification crop).

Determinism: the geometry (masks, boxes, areas, hence both annotation files and the VOC XML) uses only
uniform draws from ``numpy.random.default_rng`` and IEEE-exact arithmetic (no trigonometry), so it is
identical on every machine for a given numpy release line. Colours and noise come from a second generator;
the JPEG/PNG bytes additionally depend on the Pillow/libjpeg build and may differ between machines.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES_CATEGORIES: list[dict] = [
    {"id": 1, "name": "rectangle"},
    {"id": 3, "name": "ellipse"},
    {"id": 7, "name": "triangle"},
]
_KINDS = [c["name"] for c in SHAPES_CATEGORIES]
_CAT_ID = {c["name"]: c["id"] for c in SHAPES_CATEGORIES}

FORMAT_VERSION = 1
MANIFEST_NAME = "shapes.json"
SPLITS = ("train", "val")
MIN_SPLIT_IMAGES = 4  # images 0..2 carry the forced anchors, the 4th leaves room for an empty image
MIN_SIDE = 160  # a never-occluded triangle with area > 96**2 needs a bounding box of about 140 x 140
SMALL_MAX, LARGE_MIN = 32 * 32, 96 * 96  # COCO area ranges (pycocotools' areaRng)
MIN_CROP_SIDE = 8  # below this the object gets no crop and is VOC-difficult
DIFFICULT_VISIBLE = 0.6
MIN_VISIBLE = 0.5
MAX_OBJECTS = 6
EMPTY_FRACTION = 0.05
JPEG_QUALITY = 92

# Full-shape area ranges (pixels) for the random objects and, tighter, for the forced anchors. Anchor
# ranges keep clear of the COCO thresholds after rasterisation; anchors are never occluded.
_AREA = {"small": (64.0, 1000.0), "medium": (1100.0, 9000.0), "large": (9600.0, None)}
_ANCHOR_AREA = {"small": (300.0, 900.0), "medium": (2500.0, 6000.0), "large": (9800.0, 11500.0)}
_SIZE_PROBS = (("small", 0.45), ("medium", 0.4), ("large", 0.15))


@dataclass
class _Object:
    kind: str
    mask: np.ndarray  # (H, W) bool, the full (unoccluded) shape
    full_area: int
    min_visible: int  # later placements may not push the visible pixel count below this


# ----------------------------------------------------------------------------------------------- geometry
def _rotation(rng: np.random.Generator, kind: str) -> tuple[float, float]:
    """(cos, sin) of a random angle, built from a tangent and a quarter turn: no trig, bit-identical everywhere."""
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


def _sample_shape(rng: np.random.Generator, kind: str, area: float, aspect: float, hw: tuple[int, int]):
    """Rasterise one randomly rotated and placed shape; returns its (H, W) bool mask or None if it does not fit.

    A pixel belongs to the shape when its centre (x + 0.5, y + 0.5) lies inside the outline.
    """
    height, width = hw
    box_area = {"rectangle": area, "triangle": 2.0 * area, "ellipse": 4.0 * area / math.pi}[kind]
    h = math.sqrt(box_area / aspect)
    w = aspect * h
    c, s = _rotation(rng, kind)
    if kind == "ellipse":
        a, b = w / 2.0, h / 2.0
        ex, ey = math.sqrt(a * a * c * c + b * b * s * s), math.sqrt(a * a * s * s + b * b * c * c)
        lo_x, hi_x, lo_y, hi_y = -ex, ex, -ey, ey
    else:
        if kind == "rectangle":
            local = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
        else:  # apex somewhere along the top edge of the w x h box, base along the bottom edge
            local = [(w * rng.uniform(0.15, 0.85) - w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
        verts = [(c * x - s * y, s * x + c * y) for x, y in local]
        lo_x, hi_x = min(v[0] for v in verts), max(v[0] for v in verts)
        lo_y, hi_y = min(v[1] for v in verts), max(v[1] for v in verts)
    if hi_x - lo_x > width - 1 or hi_y - lo_y > height - 1:
        return None
    cx = -lo_x + rng.random() * (width - (hi_x - lo_x))
    cy = -lo_y + rng.random() * (height - (hi_y - lo_y))
    x0, x1 = max(0, math.floor(cx + lo_x)), min(width, math.ceil(cx + hi_x) + 1)
    y0, y1 = max(0, math.floor(cy + lo_y)), min(height, math.ceil(cy + hi_y) + 1)
    px = (np.arange(x0, x1, dtype=np.float64) + 0.5)[None, :]
    py = (np.arange(y0, y1, dtype=np.float64) + 0.5)[:, None]
    if kind == "ellipse":
        dx, dy = px - cx, py - cy
        u, v = c * dx + s * dy, c * dy - s * dx
        inside = u * u * (b * b) + v * v * (a * a) <= (a * a) * (b * b)
    else:
        pts = [(cx + x, cy + y) for x, y in verts]
        orientation = 0.0
        for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1]):
            orientation += xa * yb - xb * ya
        inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1]):
            cross = (xb - xa) * (py - ya) - (yb - ya) * (px - xa)
            inside &= cross >= 0 if orientation > 0 else cross <= 0
    mask = np.zeros(hw, dtype=bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def _layout(rng: np.random.Generator, hw: tuple[int, int], n_objects: int, anchor) -> list[_Object]:
    """Place up to ``n_objects`` shapes back to front; ``anchor`` = (kind, size) forces a protected first object."""
    height, width = hw
    large_hi = max(12000.0, 0.4 * height * width)
    objects: list[_Object] = []
    owner = np.full(hw, -1, dtype=np.int16)  # index of the object that shows at each pixel
    visible: list[int] = []

    def try_place(kind, area, aspect, tries, accept_area) -> bool:
        for _ in range(tries):
            mask = _sample_shape(rng, kind, area, aspect, hw)
            if mask is None:
                continue
            full = int(mask.sum())
            if not accept_area(full):
                continue
            lost = np.bincount(owner[mask][owner[mask] >= 0], minlength=len(objects))
            if any(visible[k] - lost[k] < objects[k].min_visible for k in range(len(objects))):
                continue  # would hide too much of an earlier object
            protected = not objects and anchor is not None
            min_vis = full if protected else max(1, math.ceil(MIN_VISIBLE * full))
            for k in range(len(objects)):
                visible[k] -= int(lost[k])
            owner[mask] = len(objects)
            objects.append(_Object(kind, mask, full, min_vis))
            visible.append(full)
            return True
        return False

    if anchor is not None:
        kind, size = anchor
        lo, hi = _ANCHOR_AREA[size]
        in_range = {"small": lambda a: 0 < a < SMALL_MAX,
                    "medium": lambda a: SMALL_MAX < a < LARGE_MIN,
                    "large": lambda a: a > LARGE_MIN}[size]
        for _ in range(50):  # each round: fresh area/aspect, then 20 rotations/positions
            area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            if try_place(kind, area, math.exp(rng.uniform(-0.3, 0.3)), 20, in_range):
                break
        else:
            raise RuntimeError(f"could not place a {size} {kind} in a {height}x{width} image")
    while len(objects) < n_objects:
        kind = _KINDS[int(rng.random() * len(_KINDS))]
        r, size = rng.random(), "large"
        for name, p in _SIZE_PROBS:
            if r < p:
                size = name
                break
            r -= p
        lo, hi = _AREA[size]
        area = math.exp(rng.uniform(math.log(lo), math.log(hi if hi is not None else large_hi)))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        if not try_place(kind, area, aspect, 30, lambda a: a >= 30):
            n_objects -= 1  # the image is too crowded for this one: skip it
    return objects


# --------------------------------------------------------------------------------------------- appearance
def _render(rng: np.random.Generator, hw: tuple[int, int], objects: list[_Object]) -> np.ndarray:
    """Paint background, distractors and objects (back to front); returns (H, W, 3) uint8 RGB."""
    height, width = hw
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    # Smooth two-colour gradient along a random direction.
    c0, c1 = rng.uniform(0, 255, (2, 3))
    d = rng.normal(size=2)
    t = xs * d[0] + ys * d[1]
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 + t[..., None] * (c1 - c0)
    # Soft blobs: Gaussian bumps without edges, so they never look like one of the classes.
    for _ in range(int(rng.integers(0, 4))):
        cx, cy, sigma = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 25)
        bump = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma * sigma))
        img += bump[..., None] * rng.uniform(-60, 60, 3)
    # Thin straight lines (1-3 px): clutter with edges that is not an object.
    for _ in range(int(rng.integers(0, 4))):
        (ax, ay), (bx, by) = rng.uniform(0, 1, (2, 2)) * (width, height)
        vx, vy = bx - ax, by - ay
        u = np.clip(((xs - ax) * vx + (ys - ay) * vy) / max(vx * vx + vy * vy, 1e-6), 0, 1)
        dist = np.hypot(xs - ax - u * vx, ys - ay - u * vy)
        img[dist <= rng.uniform(0.5, 1.5)] = rng.uniform(0, 255, 3)
    painted: list[np.ndarray] = []
    for obj in objects:
        # Pick the candidate colour farthest from what lies underneath (background and earlier objects).
        under = [img[obj.mask].mean(axis=0)] + [col for o, col in zip(objects, painted) if (o.mask & obj.mask).any()]
        candidates = rng.uniform(0, 255, (24, 3))
        score = np.min([np.linalg.norm(candidates - u, axis=1) for u in under], axis=0)
        colour = candidates[int(np.argmax(score))]
        painted.append(colour)
        # A gentle linear shading across the object so fills are not perfectly flat.
        g = rng.uniform(-0.25, 0.25, 2)
        shade = (xs - xs[obj.mask].mean()) * g[0] + (ys - ys[obj.mask].mean()) * g[1]
        img[obj.mask] = colour + shade[obj.mask][:, None]
    img += rng.normal(0.0, rng.uniform(2.0, 8.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
