"""Synthetic "shapes" detection dataset: a small, deterministic stand-in for COCO that builds in seconds.

Layout written under ``out`` (every box below is integer-aligned, so all layouts round-trip exactly)::

    images/{train,val}/000001.jpg             image ids are unique across both splits
    annotations/instances_{train,val}.json    COCO: bbox [x, y, w, h] of the VISIBLE mask, RLE segmentation
    voc/JPEGImages/000001.jpg                 (voc=True) Pascal VOC copy of the same images
    voc/Annotations/000001.xml                VOC boxes xmin, ymin, xmax, ymax = x + 1, y + 1, x + w, y + h
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
uniform draws from ``numpy.random.default_rng`` and correctly rounded IEEE arithmetic (+ - * / sqrt; no
trigonometry, log or exp, whose last bit depends on the C library), so it is identical on every machine for
a given numpy release line. Colours and noise come from a second generator per image; the JPEG/PNG bytes
also depend on the Pillow/libjpeg build, so pixels may differ slightly between machines.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import tempfile
import time
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
# 1000 training images (~3,200 crops): with 300, pretraining on the crops plateaued at ~85% validation
# accuracy and the detectors with it (docs/benchmarks.md); generating them takes ~20 s.
DEFAULT_NUM_TRAIN = 1000
DEFAULT_NUM_VAL = 60
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


def _sample_shape(rng: np.random.Generator, kind: str, area: float, aspect: float, hw: tuple[int, int]):
    """Rasterise one randomly rotated and placed shape: its (H, W) bool mask, or None if it does not fit.

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
        for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1], strict=True):
            orientation += xa * yb - xb * ya
        inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1], strict=True):
            cross = (xb - xa) * (py - ya) - (yb - ya) * (px - xa)
            inside &= cross >= 0 if orientation > 0 else cross <= 0
    mask = np.zeros(hw, dtype=bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def _layout(rng: np.random.Generator, hw: tuple[int, int], n_objects: int, anchor) -> list[_Object]:
    """Place up to ``n_objects`` shapes back to front; ``anchor`` = (kind, size) is a protected first one."""
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
        in_range = {
            "small": lambda a: 0 < a < SMALL_MAX,
            "medium": lambda a: SMALL_MAX < a < LARGE_MIN,
            "large": lambda a: a > LARGE_MIN,
        }[size]
        for _ in range(50):  # each round: fresh area/aspect, then 20 rotations/positions
            if try_place(kind, _skewed(rng, lo, hi), _aspect(rng, 1.35), 20, in_range):
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
        area = _skewed(rng, lo, hi if hi is not None else large_hi)
        if not try_place(kind, area, _aspect(rng, 2.0), 30, lambda a: a >= 30):
            n_objects -= 1  # the image is too crowded for this one: skip it
    return objects


# --------------------------------------------------------------------------------------------- appearance
def _window(cx: float, cy: float, radius: float, hw: tuple[int, int]) -> tuple[slice, slice]:
    """Row/column slices of the pixels within ``radius`` of (cx, cy), clipped to the image."""
    return (
        slice(max(0, int(cy - radius)), max(0, min(hw[0], int(cy + radius) + 2))),
        slice(max(0, int(cx - radius)), max(0, min(hw[1], int(cx + radius) + 2))),
    )


def _render(rng: np.random.Generator, hw: tuple[int, int], objects: list[_Object]) -> np.ndarray:
    """Paint background, distractors and objects (back to front); returns (H, W, 3) uint8 RGB."""
    height, width = hw
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
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
    painted: list[np.ndarray] = []
    for obj in objects:
        rows, cols = np.nonzero(obj.mask)
        # Pick the candidate colour farthest from what lies underneath (background and earlier objects).
        under = [img[rows, cols].mean(axis=0)]
        under += [col for o, col in zip(objects, painted, strict=False) if o.mask[rows, cols].any()]
        candidates = rng.uniform(0, 255, (24, 3)).astype(np.float32)
        score = np.min([np.linalg.norm(candidates - u, axis=1) for u in under], axis=0)
        colour = candidates[int(np.argmax(score))]
        painted.append(colour)
        # A gentle linear shading across the object so fills are not perfectly flat.
        g = rng.uniform(-0.25, 0.25, 2).astype(np.float32)
        shade = (cols - cols.mean()) * g[0] + (rows - rows.mean()) * g[1]
        img[rows, cols] = colour + shade[:, None]
    # Sensor-like noise; uniform rather than Gaussian because it is 3x cheaper to draw (std 2..7 levels).
    img += (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(rng.uniform(7.0, 24.0))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ writing
def _visible_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Integer COCO box [x, y, w, h] (0-based pixel edges) of a non-empty (H, W) bool mask."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _size_name(area: float) -> str:
    return "small" if area < SMALL_MAX else ("large" if area > LARGE_MIN else "medium")


def _voc_xml(
    stem: str, hw: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int], bool]]
) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = f"{stem}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "litvision synthetic shapes"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", hw[1]), ("height", hw[0]), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (x, y, w, h), difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"  # shapes always lie fully inside the image
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        box = ET.SubElement(obj, "bndbox")
        # VOC is 1-based with inclusive corners: 0-based pixel edges [x, x + w) -> xmin = x + 1, xmax = x + w.
        for tag, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def _write_split(root: Path, params: dict, split: str, first_id: int) -> dict:
    """Generate and write one split under ``root``; returns its counts for the manifest."""
    code, n = SPLITS.index(split), params[f"num_{split}"]
    hw = tuple(params["image_size"])
    seed = params["seed"]
    plan = np.random.default_rng([seed, code])
    anchors = [
        (_KINDS[k], size) for k, size in zip(plan.permutation(3), ("small", "medium", "large"), strict=True)
    ]
    n_empty = max(1, round(EMPTY_FRACTION * n))
    empty = set((3 + plan.permutation(n - 3)[:n_empty]).tolist())

    image_dir = root / "images" / split
    image_dir.mkdir(parents=True)
    counts = {
        "images": n,
        "empty_images": 0,
        "annotations": 0,
        "difficult": 0,
        "crops": 0,
        "per_class": dict.fromkeys(_KINDS, 0),
        "per_size": dict.fromkeys(("small", "medium", "large"), 0),
    }
    if params["classification"]:
        for kind in _KINDS:
            (root / "classification" / split / kind).mkdir(parents=True)
    images, annotations, stems = [], [], []
    for i in range(n):
        # One generator per image and purpose: geometry never depends on how many colour draws were made.
        geo = np.random.default_rng([seed, code, i, 0])
        look = np.random.default_rng([seed, code, i, 1])
        n_objects = 0 if i in empty else 1 + int(geo.random() * MAX_OBJECTS)
        objects = _layout(geo, hw, n_objects, anchors[i] if i < 3 else None)
        pixels = _render(look, hw, objects)
        image_id, stem = first_id + i, f"{first_id + i:06d}"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        (image_dir / f"{stem}.jpg").write_bytes(buffer.getvalue())
        images.append(
            {"id": image_id, "file_name": f"{stem}.jpg", "width": hw[1], "height": hw[0], "license": 1}
        )
        stems.append(stem)
        counts["empty_images"] += not objects

        covered = np.zeros(hw, dtype=bool)
        visible_masks = []
        for obj in reversed(objects):  # later objects are on top
            visible_masks.append(obj.mask & ~covered)
            covered |= obj.mask
        voc_objects = []
        for obj, vis in zip(objects, reversed(visible_masks), strict=True):
            x, y, w, h = _visible_box(vis)
            area = int(vis.sum())
            rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
            ann_id = len(annotations) + 1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": _CAT_ID[obj.kind],
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(area),
                    "iscrowd": 0,
                    "segmentation": {
                        "size": [int(s) for s in rle["size"]],
                        "counts": rle["counts"].decode("ascii"),
                    },
                }
            )
            difficult = area < DIFFICULT_VISIBLE * obj.full_area or min(w, h) < MIN_CROP_SIDE
            voc_objects.append((obj.kind, (x, y, w, h), difficult))
            counts["per_class"][obj.kind] += 1
            counts["per_size"][_size_name(area)] += 1
            counts["difficult"] += difficult
            if params["classification"] and min(w, h) >= MIN_CROP_SIDE:
                margin = max(2, round(0.1 * max(w, h)))
                crop = pixels[max(0, y - margin) : y + h + margin, max(0, x - margin) : x + w + margin]
                Image.fromarray(crop).save(
                    root / "classification" / split / obj.kind / f"{stem}_{ann_id:05d}.png", compress_level=1
                )
                counts["crops"] += 1
        counts["annotations"] += len(objects)
        if params["voc"]:
            (root / "voc" / "JPEGImages" / f"{stem}.jpg").write_bytes(buffer.getvalue())
            (root / "voc" / "Annotations" / f"{stem}.xml").write_bytes(_voc_xml(stem, hw, voc_objects))
    if params["voc"]:
        (root / "voc" / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))

    coco = {
        # No timestamps: the file must be byte-identical for the same seed.
        "info": {
            "description": f"litvision synthetic shapes, {split} split, seed {seed}",
            "version": str(FORMAT_VERSION),
            "contributor": "litvision detectors.data.shapes",
            "url": "",
            "year": 2024,
            "date_created": "",
        },
        "licenses": [
            {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "images": images,
        "annotations": annotations,
        "categories": [{**c, "supercategory": "shape"} for c in SHAPES_CATEGORIES],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return counts


def _write_dataset(root: Path, params: dict) -> None:
    if params["voc"]:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (root / "voc" / sub).mkdir(parents=True)
    counts = {"train": _write_split(root, params, "train", first_id=1)}
    counts["val"] = _write_split(root, params, "val", first_id=1 + params["num_train"])
    if params["voc"]:
        main = root / "voc" / "ImageSets" / "Main"
        (main / "trainval.txt").write_text((main / "train.txt").read_text() + (main / "val.txt").read_text())
    manifest = {
        "generator": "detectors.data.shapes",
        "format_version": FORMAT_VERSION,
        "parameters": params,
        "categories": SHAPES_CATEGORIES,
        "counts": counts,
        "voc_difficult_rule": f"visible pixels < {DIFFICULT_VISIBLE:.0%} of the full shape, or visible box "
        f"side < {MIN_CROP_SIDE} px",
    }
    # Written last: a directory with a manifest is a complete dataset.
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- public API
def _check_params(num_train, num_val, image_size, seed, voc, classification) -> dict:
    def as_int(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"shapes: {name} must be an integer >= {minimum}, got {value!r}")
        return int(value)

    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"shapes: image_size must be (height, width), got {image_size!r}")
    return {
        "num_train": as_int("num_train", num_train, MIN_SPLIT_IMAGES),
        "num_val": as_int("num_val", num_val, MIN_SPLIT_IMAGES),
        # Large (> 96**2 px) never-occluded objects of every class must fit.
        "image_size": [
            as_int("image height", image_size[0], MIN_SIDE),
            as_int("image width", image_size[1], MIN_SIDE),
        ],
        "seed": as_int("seed", seed, 0),
        "voc": bool(voc),
        "classification": bool(classification),
    }


def _paths(out: Path, params: dict) -> dict[str, Path]:
    paths = {"root": out, "manifest": out / MANIFEST_NAME}
    for split in SPLITS:
        paths[f"{split}_images"] = out / "images" / split
        paths[f"{split}_annotations"] = out / "annotations" / f"instances_{split}.json"
        if params["classification"]:
            paths[f"{split}_classification"] = out / "classification" / split
    if params["voc"]:
        paths["voc"] = out / "voc"
    if params["classification"]:
        paths["classification"] = out / "classification"
    return paths


def _existing(out: Path, params: dict) -> str | None:
    """None if ``out`` can be (re)generated freely, "same" if it already holds this dataset, else why not."""
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir():
        return "exists and is not a directory"
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        return None if not any(out.iterdir()) else f"exists and is not a shapes dataset (no {MANIFEST_NAME})"
    try:
        manifest = json.loads(manifest_path.read_text())
        old = manifest["parameters"]
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"has an unreadable {MANIFEST_NAME} ({err})"
    if version != FORMAT_VERSION:
        return f"was written by shapes format version {version}, this is version {FORMAT_VERSION}"
    if old != params:
        diff = ", ".join(
            f"{k}={old.get(k)!r} (requested {v!r})" for k, v in params.items() if old.get(k) != v
        )
        return f"holds a shapes dataset generated with different parameters: {diff}"
    missing = [str(p) for p in _paths(out, params).values() if not p.exists()]
    return f"is incomplete, missing {', '.join(missing)}" if missing else "same"


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``; an existing ``out`` is moved aside, then deleted."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / "old")
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(trash / "old", out)  # put the old content back
        trash.rmdir()
        raise
    shutil.rmtree(trash)


def _generate(out, num_train, num_val, image_size, seed, voc, classification, overwrite) -> tuple[dict, bool]:
    out = Path(out)
    params = _check_params(num_train, num_val, image_size, seed, voc, classification)
    state = _existing(out, params)
    if state == "same":
        return _paths(out, params), False
    if state is not None and not overwrite:
        raise FileExistsError(f"{out} {state}; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling so a crash never leaves a half-written dataset at ``out``; the rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_dataset(tmp, params)
        # Several processes (DDP ranks, each building its DataModule) may generate at once: whoever
        # publishes first wins, and the others keep that identical dataset instead of replacing it.
        if _existing(out, params) == "same":
            shutil.rmtree(tmp)
            return _paths(out, params), False
        try:
            _publish(tmp, out)
        except OSError:
            if _existing(out, params) != "same":
                raise
            shutil.rmtree(tmp)
            return _paths(out, params), False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(out, params), True


def generate_shapes(
    out: str | os.PathLike,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: tuple[int, int] = (192, 192),
    seed: int = 0,
    voc: bool = True,
    classification: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the synthetic shapes dataset to ``out`` (layout in the module docstring) and return its paths.

    ``image_size`` is (height, width), each >= 160; each split needs >= 4 images. Returns a dict with keys
    root, manifest, {train,val}_images, {train,val}_annotations and, when enabled, voc, classification and
    {train,val}_classification. If ``out`` already holds a dataset generated with the same parameters nothing
    is written, even with ``overwrite`` (the parameters determine the content). Raises FileExistsError if
    ``out`` holds anything else (other parameters, unknown files, an incomplete dataset) unless
    ``overwrite`` is True, in which case that content is deleted and replaced. Raises ValueError for invalid
    parameters.
    """
    return _generate(out, num_train, num_val, image_size, seed, voc, classification, overwrite)[0]


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m detectors.shapes --out DIR [--num-train N] [--num-val N] [--seed S] ...``."""
    parser = argparse.ArgumentParser(prog="python -m detectors.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="dataset directory to create")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN,
                        help=f"training images (default {DEFAULT_NUM_TRAIN})")
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL,
                        help=f"validation images (default {DEFAULT_NUM_VAL})")
    parser.add_argument("--height", type=int, default=192, help="image height in pixels (default 192)")
    parser.add_argument("--width", type=int, default=192, help="image width in pixels (default 192)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-voc", action="store_true", help="skip the Pascal VOC copy under OUT/voc")
    parser.add_argument(
        "--no-classification", action="store_true", help="skip the crops under OUT/classification"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace whatever OUT holds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        paths, generated = _generate(
            args.out,
            args.num_train,
            args.num_val,
            (args.height, args.width),
            args.seed,
            not args.no_voc,
            not args.no_classification,
            args.overwrite,
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    manifest = json.loads(paths["manifest"].read_text())
    p = manifest["parameters"]
    state = (
        f"generated in {time.perf_counter() - start:.1f} s"
        if generated
        else "already there with the same parameters, nothing written"
    )
    print(
        f"shapes dataset {paths['root']} ({p['image_size'][0]}x{p['image_size'][1]} px, seed {p['seed']}): "
        f"{state}"
    )
    for split in SPLITS:
        c = manifest["counts"][split]
        classes = ", ".join(f"{k} {v}" for k, v in c["per_class"].items())
        sizes = ", ".join(f"{k} {v}" for k, v in c["per_size"].items())
        print(
            f"  {split}: {c['images']} images ({c['empty_images']} empty), {c['annotations']} objects "
            f"({classes}; {sizes})"
        )
        print(f"    COCO {paths[f'{split}_images']}  {paths[f'{split}_annotations']}")
    if "voc" in paths:
        difficult = sum(manifest["counts"][s]["difficult"] for s in SPLITS)
        print(f"  VOC {paths['voc']} ({difficult} objects marked difficult)")
    if "classification" in paths:
        crops = sum(manifest["counts"][s]["crops"] for s in SPLITS)
        print(f"  classification {paths['classification']} ({crops} crops)")
    return 0


def shapes_command(
    out: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    height: int = 192,
    width: int = 192,
    seed: int = 0,
    voc: bool = True,
    classification: bool = True,
    overwrite: bool = False,
) -> None:
    """Generate the embedded shapes dataset: COCO under OUT, VOC under OUT/voc, crops under OUT/classification.

    Args:
        out: dataset directory.
        num_train, num_val: images per split.
        height, width: image size in pixels (>= 160).
        seed: random seed; the same seed gives the same annotations on any machine.
        voc, classification: also write the Pascal VOC and the image-folder layouts.
        overwrite: replace a dataset generated with other parameters.
    """
    paths = generate_shapes(out, num_train, num_val, (height, width), seed, voc, classification, overwrite)
    for key, path in paths.items():
        print(f"{key:24s} {path}")
