"""The files of one shapes dataset, written into a new directory (layout and rules: detectors.data.shapes).

``write_dataset`` draws every image with ``shapes_scene.draw_scene`` and writes it once as JPEG, then its
objects' visible boxes and RLE masks as COCO annotations, a VOC copy, YOLO label files (over the same
``images/<split>`` JPEGs, the folders Ultralytics' layout names) and the classification crops, split by split,
and the manifest last.
"""

from __future__ import annotations

import io
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .shapes_scene import (
    KINDS,
    LARGE_MIN,
    SHAPES_CATEGORIES,
    SIZES,
    SMALL_MAX,
    Shape,
    draw_scene,
    visible_masks,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "shapes.json"
YOLO_YAML = "data.yaml"
SPLITS = ("train", "val")
MIN_CROP_SIDE = 8  # below this the object gets no crop and is VOC-difficult
DIFFICULT_VISIBLE = 0.6
EMPTY_FRACTION = 0.05
JPEG_QUALITY = 92
_CAT_ID = {c["name"]: c["id"] for c in SHAPES_CATEGORIES}
_CROP = re.compile(r"(\d{6,})_\d{5,}\.png")  # <image stem>_<annotation id>.png


class _Annotated(NamedTuple):
    """One object as written: class, visible box [x, y, w, h] in integer pixel edges, VOC flag, COCO id."""

    kind: str
    box: tuple[int, int, int, int]
    difficult: bool
    ann_id: int


def _visible_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Integer COCO box [x, y, w, h] (0-based pixel edges) of a non-empty bool[H, W] mask."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _size_name(area: float) -> str:
    return "small" if area < SMALL_MAX else ("large" if area > LARGE_MIN else "medium")


def _split_plan(seed: int, code: int, n: int) -> tuple[list[tuple[str, str]], set[int]]:
    """The (kind, size) anchors of images 0..2 (each class and size once) and the indices of empty images."""
    plan = np.random.default_rng([seed, code])
    anchors = [(KINDS[k], size) for k, size in zip(plan.permutation(3), SIZES, strict=True)]
    n_empty = max(1, round(EMPTY_FRACTION * n))
    return anchors, set((3 + plan.permutation(n - 3)[:n_empty]).tolist())


def _new_counts(n_images: int) -> dict:
    return {
        "images": n_images,
        "empty_images": 0,
        "annotations": 0,
        "difficult": 0,
        "crops": 0,
        "per_class": dict.fromkeys(KINDS, 0),
        "per_size": dict.fromkeys(SIZES, 0),
    }


def _annotate(image_id: int, shapes: list[Shape], annotations: list[dict], counts: dict) -> list[_Annotated]:
    """Append the COCO annotations of one image's ``shapes`` to ``annotations`` (ids continue from its
    length), add them to ``counts``, and return them for the VOC file and the crops."""
    objects = []
    for shape, visible in zip(shapes, visible_masks(shapes), strict=True):
        x, y, w, h = box = _visible_box(visible)
        area = int(visible.sum())
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        ann_id = len(annotations) + 1
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": _CAT_ID[shape.kind],
                "bbox": [float(x), float(y), float(w), float(h)],
                "area": float(area),
                "iscrowd": 0,
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
        difficult = area < DIFFICULT_VISIBLE * shape.full_area or min(w, h) < MIN_CROP_SIDE
        objects.append(_Annotated(shape.kind, box, difficult, ann_id))
        counts["per_class"][shape.kind] += 1
        counts["per_size"][_size_name(area)] += 1
        counts["difficult"] += difficult
    counts["annotations"] += len(shapes)
    return objects


def _write_crops(folder: Path, stem: str, pixels: np.ndarray, objects: list[_Annotated]) -> int:
    """Save each object at least MIN_CROP_SIDE px wide and tall as ``folder/<class>/<stem>_<ann id>.png``,
    its visible box plus a margin; returns how many."""
    n = 0
    for obj in objects:
        x, y, w, h = obj.box
        if min(w, h) < MIN_CROP_SIDE:
            continue
        margin = max(2, round(0.1 * max(w, h)))
        crop = pixels[max(0, y - margin) : y + h + margin, max(0, x - margin) : x + w + margin]
        Image.fromarray(crop).save(folder / obj.kind / f"{stem}_{obj.ann_id:05d}.png", compress_level=1)
        n += 1
    return n


def _voc_xml(stem: str, hw: tuple[int, int], objects: list[_Annotated]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = f"{stem}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "litvision synthetic shapes"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", hw[1]), ("height", hw[0]), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (x, y, w, h), difficult, _ in objects:
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


def _yolo_labels(hw: tuple[int, int], objects: list[_Annotated]) -> str:
    """One ``class cx cy w h`` row per object, normalised by the image size. Python's shortest repr of each
    float64 reads back as the same float64, so a reader's pixels equal the integer box to ~1e-13 px."""
    height, width = hw
    rows = []
    for name, (x, y, w, h), _, _ in objects:
        values = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
        rows.append(" ".join([str(KINDS.index(name)), *(repr(float(v)) for v in values)]) + "\n")
    return "".join(rows)


def _yolo_yaml(seed: int) -> str:
    """No ``path``: the yaml's folder is the root, for litvision and for Ultralytics (which would resolve a
    relative ``path`` against the working directory or its datasets_dir setting)."""
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(KINDS))
    return (f"# litvision synthetic shapes, seed {seed}: YOLO (Ultralytics) layout over the COCO copy's images\n"
            f"train: images/train\nval: images/val\nnames:\n{names}")  # fmt: skip


def yolo_copy(root: Path, params: dict) -> dict[Path, str]:
    """The YOLO copy's files (path -> text) of the shapes dataset in ``root``, derived from its COCO files: the
    same files ``write_dataset`` writes with yolo=True, for a dataset written before the copy existed."""
    name_of = {c["id"]: c["name"] for c in SHAPES_CATEGORIES}
    hw = tuple(params["image_size"])
    files = {root / YOLO_YAML: _yolo_yaml(params["seed"])}
    for split in SPLITS:
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        objects: dict[int, list[_Annotated]] = {img["id"]: [] for img in coco["images"]}
        for a in coco["annotations"]:  # in the order the objects were written
            box = tuple(int(v) for v in a["bbox"])
            objects[a["image_id"]].append(_Annotated(name_of[a["category_id"]], box, False, a["id"]))
        for img in coco["images"]:
            stem = Path(img["file_name"]).stem
            files[root / "labels" / split / f"{stem}.txt"] = _yolo_labels(hw, objects[img["id"]])
    return files


def _coco_file(split: str, seed: int, images: list[dict], annotations: list[dict]) -> dict:
    return {
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


def _write_split(root: Path, params: dict, split: str, first_id: int) -> dict:
    """Generate and write one split under ``root``; returns its counts for the manifest."""
    code, n = SPLITS.index(split), params[f"num_{split}"]
    hw, seed = tuple(params["image_size"]), params["seed"]
    anchors, empty = _split_plan(seed, code, n)
    (root / "images" / split).mkdir(parents=True)
    if params["yolo"]:
        (root / "labels" / split).mkdir(parents=True)
    crops = root / "classification" / split
    if params["classification"]:
        for kind in KINDS:
            (crops / kind).mkdir(parents=True)
    counts = _new_counts(n)
    images, annotations, stems = [], [], []
    for i in range(n):
        shapes, pixels = draw_scene(seed, code, i, hw, i in empty, anchors[i] if i < 3 else None)
        image_id, stem = first_id + i, f"{first_id + i:06d}"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        (root / "images" / split / f"{stem}.jpg").write_bytes(buffer.getvalue())
        images.append(
            {"id": image_id, "file_name": f"{stem}.jpg", "width": hw[1], "height": hw[0], "license": 1}
        )
        stems.append(stem)
        counts["empty_images"] += not shapes
        objects = _annotate(image_id, shapes, annotations, counts)
        if params["classification"]:
            counts["crops"] += _write_crops(crops, stem, pixels, objects)
        if params["yolo"]:
            (root / "labels" / split / f"{stem}.txt").write_text(_yolo_labels(hw, objects))
        if params["voc"]:
            (root / "voc" / "JPEGImages" / f"{stem}.jpg").write_bytes(buffer.getvalue())
            (root / "voc" / "Annotations" / f"{stem}.xml").write_bytes(_voc_xml(stem, hw, objects))
    if params["voc"]:
        (root / "voc" / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
    (root / "annotations").mkdir(exist_ok=True)
    coco = _coco_file(split, seed, images, annotations)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return counts


def write_dataset(root: Path, params: dict) -> None:
    """Write the whole dataset for the checked ``params`` into the new directory ``root``."""
    if params["voc"]:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (root / "voc" / sub).mkdir(parents=True)
    counts = {"train": _write_split(root, params, "train", first_id=1)}
    counts["val"] = _write_split(root, params, "val", first_id=1 + params["num_train"])
    if params["voc"]:
        main = root / "voc" / "ImageSets" / "Main"
        (main / "trainval.txt").write_text((main / "train.txt").read_text() + (main / "val.txt").read_text())
    if params["yolo"]:
        (root / YOLO_YAML).write_text(_yolo_yaml(params["seed"]))
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


def generated_files(root: Path, params: dict) -> set[Path]:
    """The files under ``root`` that ``write_dataset`` writes for ``params`` and that exist there, manifest
    included: the only files ``generate_shapes(overwrite=True)`` may remove. Derived from the layout, so a
    user's file in the folder is never counted, whatever its name, unless it sits where the layout writes."""
    ids = {"train": range(1, 1 + params["num_train"])}
    ids["val"] = range(1 + params["num_train"], 1 + params["num_train"] + params["num_val"])
    files = [root / MANIFEST_NAME]
    for split in SPLITS:
        files.append(root / "annotations" / f"instances_{split}.json")
        files += [root / "images" / split / f"{i:06d}.jpg" for i in ids[split]]
        if params["voc"]:
            files.append(root / "voc" / "ImageSets" / "Main" / f"{split}.txt")
            files += [root / "voc" / "JPEGImages" / f"{i:06d}.jpg" for i in ids[split]]
            files += [root / "voc" / "Annotations" / f"{i:06d}.xml" for i in ids[split]]
        if params["yolo"]:
            files += [root / "labels" / split / f"{i:06d}.txt" for i in ids[split]]
        if params["classification"]:
            for kind in KINDS:
                folder = root / "classification" / split / kind
                crops = [(n, _CROP.fullmatch(n)) for n in (os.listdir(folder) if folder.is_dir() else [])]
                files += [folder / n for n, m in crops if m and int(m.group(1)) in ids[split]]
    if params["voc"]:
        files.append(root / "voc" / "ImageSets" / "Main" / "trainval.txt")
    if params["yolo"]:
        files.append(root / YOLO_YAML)
    return {f for f in files if f.is_file() and not f.is_symlink()}


def layout_folders(root: Path) -> list[Path]:
    """Every folder ``write_dataset`` may create under ``root``, deepest first (removed when left empty)."""
    folders = [root / "classification" / s / k for s in SPLITS for k in KINDS]
    folders += [root / "classification" / s for s in SPLITS] + [root / "classification"]
    folders += [root / "images" / s for s in SPLITS] + [root / "images", root / "annotations"]
    folders += [root / "labels" / s for s in SPLITS] + [root / "labels"]
    main = root / "voc" / "ImageSets" / "Main"
    voc = root / "voc"
    return folders + [main, main.parent, voc / "JPEGImages", voc / "Annotations", voc]
