"""COCO files in and out: a ground-truth (instances) file and a results file read into per-image dicts,
validated entry by entry, and the metrics written as flat JSON.

COCO category ids and XYWH boxes exist only here, at the file boundary: category ids become contiguous
labels 1..K (ascending id), and boxes come out in the ``box_format`` asked for. Every malformed entry is an
error naming the file and the entry, because pycocotools either crashes far from the cause or silently
drops what it does not know.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert

from training.checkpoint_io import atomic_write_bytes
from training.errors import BadValueError

from ..data.coco import read_json
from .inputs import BoxFormat


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _string(x: object) -> bool:
    return isinstance(x, str)


def _box(x: object) -> bool:
    return isinstance(x, list) and len(x) == 4 and all(_number(c) for c in x)


# kind -> (test, what the error message says a value must be)
_KINDS = {
    "int": (_integer, "int"),
    "num": (_number, "num"),
    "str": (_string, "str"),
    "box": (_box, "four numbers"),
}


def _check_entry(entry: object, keys: dict[str, str], where: str) -> None:
    """``keys`` maps a key to 'int', 'num', 'str' or 'box' (four finite numbers). Called once per entry of
    files that hold hundreds of thousands, so it runs only the one test each key needs."""
    if not isinstance(entry, dict):
        raise BadValueError(f"{where}: expected an object, got {entry!r}")
    for key, kind in keys.items():
        if key not in entry:
            raise BadValueError(f"{where}: missing key {key!r}")
        test, what = _KINDS[kind]
        if not test(entry[key]):
            raise BadValueError(f"{where}: {key!r} must be {what}, got {entry[key]!r}")


def _coco_boxes(rows: list[list[float]], box_format: BoxFormat) -> Tensor:
    b = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)  # float64 keeps the file's values exactly
    return b if box_format == "xywh" else box_convert(b, "xywh", "xyxy")


@dataclass
class CocoGroundTruth:
    """A COCO ground-truth file in evaluator form: ``targets[i]`` belongs to ``image_ids[i]`` (ascending,
    like pycocotools); label ``k + 1`` is category ``category_ids[k]`` named ``class_names[k]``; boxes are
    float64 in ``box_format``."""

    path: str
    image_ids: list[int]
    category_ids: list[int]
    class_names: list[str]
    targets: list[dict]
    box_format: BoxFormat = "xyxy"


def load_coco_ground_truth(gt_json: str | os.PathLike, box_format: BoxFormat = "xyxy") -> CocoGroundTruth:
    """Read and validate a COCO instances file; boxes XYWH -> ``box_format`` (float64), category ids -> labels
    1..K (ascending id), ``area`` and ``iscrowd`` from the annotations (``area`` defaults to w*h when absent).
    Every image is kept, with or without annotations."""
    path = os.fspath(gt_json)
    data = read_json(path)
    if not isinstance(data, dict):
        raise BadValueError(f"{path}: expected a COCO ground-truth object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise BadValueError(f"{path}: missing or non-list {key!r}")
    for i, img in enumerate(data["images"]):
        _check_entry(img, {"id": "int"}, f"{path}: images[{i}]")
    for i, cat in enumerate(data["categories"]):
        _check_entry(cat, {"id": "int", "name": "str"}, f"{path}: categories[{i}]")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_ids, names = [c["id"] for c in cats], [c["name"] for c in cats]
    if len(set(cat_ids)) != len(cat_ids) or len(set(names)) != len(names):
        raise BadValueError(f"{path}: category ids and names must be unique")
    image_ids = sorted({img["id"] for img in data["images"]})
    if len(image_ids) != len(data["images"]):
        raise BadValueError(f"{path}: duplicate image ids")
    label_of = {c: k + 1 for k, c in enumerate(cat_ids)}
    per_image: dict[int, list[dict]] = {i: [] for i in image_ids}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        _check_entry(ann, {"image_id": "int", "category_id": "int", "bbox": "box"}, where)
        if ann["image_id"] not in per_image:
            raise BadValueError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in label_of:
            raise BadValueError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        if "area" in ann:
            _check_entry(ann, {"area": "num"}, where)
        if ann.get("iscrowd", 0) not in (0, 1):
            raise BadValueError(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
        per_image[ann["image_id"]].append(ann)
    targets = []
    for img in image_ids:
        anns = per_image[img]  # file order, as pycocotools' imgToAnns
        targets.append({
            "boxes": _coco_boxes([a["bbox"] for a in anns], box_format),
            "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
                                 dtype=torch.float64),
        })  # fmt: skip
    return CocoGroundTruth(path, image_ids, cat_ids, names, targets, box_format)


def load_coco_predictions(predictions_json: str | os.PathLike, gt: CocoGroundTruth) -> list[dict]:
    """Read a COCO results file (a list of ``{image_id, category_id, bbox: [x, y, w, h], score}``) into one
    prediction dict per ``gt.image_ids`` entry, boxes in ``gt.box_format`` (file order kept within an image;
    images without detections get empty tensors). An image or category missing from the ground truth is an
    error: pycocotools rejects the former and silently drops the latter, which hides label-mapping bugs."""
    path = os.fspath(predictions_json)
    data = read_json(path)
    if not isinstance(data, list):
        raise BadValueError(f"{path}: expected a JSON list of detections (COCO results format)")
    index = {img: i for i, img in enumerate(gt.image_ids)}
    label_of = {c: k + 1 for k, c in enumerate(gt.category_ids)}
    rows: list[list[dict]] = [[] for _ in gt.image_ids]
    unknown_images: set[int] = set()
    for i, det in enumerate(data):
        where = f"{path}: [{i}]"
        _check_entry(det, {"image_id": "int", "category_id": "int", "bbox": "box", "score": "num"}, where)
        if det["image_id"] not in index:
            unknown_images.add(det["image_id"])
            continue
        if det["category_id"] not in label_of:
            raise BadValueError(f"{where}: category_id {det['category_id']} is not a category of {gt.path}")
        rows[index[det["image_id"]]].append(det)
    if unknown_images:
        some = sorted(unknown_images)[:10]
        raise BadValueError(
            f"{path}: {len(unknown_images)} image id(s) not in the ground truth {gt.path}: {some}"
        )
    return [
        {
            "boxes": _coco_boxes([d["bbox"] for d in dets], gt.box_format),
            "scores": torch.tensor([float(d["score"]) for d in dets], dtype=torch.float64),
            "labels": torch.tensor([label_of[d["category_id"]] for d in dets], dtype=torch.int64),
        }
        for dets in rows
    ]


def write_metrics_json(metrics: dict[str, float], path: str | os.PathLike) -> None:
    """Write ``metrics`` as a flat JSON object, atomically (``training.checkpoint_io.atomic_write``)."""
    atomic_write_bytes(path, (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
