"""COCO files in and out: a ground-truth (instances) file and a results file read into per-image dicts,
validated, and the metrics written as flat JSON.

COCO category ids and XYWH boxes exist only here, at the file boundary: category ids become contiguous
labels 1..K (ascending id), and boxes come out in the ``box_format`` asked for. Every malformed entry is an
error naming the file and the entry, because pycocotools either crashes far from the cause or silently
drops what it does not know. The annotations and detections are read as numpy columns and checked a
column at a time (a results file holds hundreds of thousands of entries); when a column fails, the
entries are checked one by one to name the first bad one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from itertools import chain

import numpy as np
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


_ANNOTATION_KEYS = {"image_id": "int", "category_id": "int", "bbox": "box"}
_DETECTION_KEYS = {"image_id": "int", "category_id": "int", "bbox": "box", "score": "num"}
_NO_AREA = object()  # an annotation without "area"


class _Irregular(Exception):
    """An entry :func:`_columns` cannot read as a column; :func:`_check_entry` then names it."""


def _columns(entries: list, keys: dict[str, str]) -> dict[str, np.ndarray]:
    """``keys`` ('int', 'num' or 'box', as in :func:`_check_entry`) of every entry as numpy columns: int64
    [N], float64 [N], float64 [N, 4]. Type tests run over whole columns (a set of the value types), which
    is what keeps a results file of a million entries fast; any entry that is not a dict, lacks a key or
    holds a value of another kind raises :class:`_Irregular`, and the caller's per-entry check then
    reports the first bad entry as it would have without this shortcut."""
    if not set(map(type, entries)) <= {dict}:
        raise _Irregular
    out = {}
    try:
        for key, kind in keys.items():
            values = [e[key] for e in entries]
            if kind == "box":
                if not set(map(type, values)) <= {list} or not set(map(len, values)) <= {4}:
                    raise _Irregular
                values = list(chain.from_iterable(values))
            if not set(map(type, values)) <= ({int} if kind == "int" else {int, float}):
                raise _Irregular
            col = np.asarray(values, dtype=np.int64 if kind == "int" else np.float64)
            if kind != "int" and not np.isfinite(col).all():
                raise _Irregular
            out[key] = col.reshape(-1, 4) if kind == "box" else col
    except (KeyError, OverflowError) as e:  # a missing key, an integer beyond 64 bits
        raise _Irregular from e
    return out


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each of ``ids`` in ``sorted_ids``, whether it is there at all)."""
    pos = np.searchsorted(sorted_ids, ids).clip(max=max(len(sorted_ids) - 1, 0))
    found = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
    return pos, found


def _per_image(image_pos: np.ndarray, num_images: int, columns: dict[str, Tensor]) -> list[dict]:
    """Rows grouped by image (file order kept within an image): one dict of ``columns`` per image."""
    order = torch.from_numpy(np.argsort(image_pos, kind="stable"))
    counts = np.bincount(image_pos, minlength=num_images).tolist()
    split = {k: v[order].split(counts) for k, v in columns.items()}
    return [{k: split[k][i] for k in columns} for i in range(num_images)]


def _coco_boxes(rows: np.ndarray, box_format: BoxFormat) -> Tensor:
    b = torch.from_numpy(rows).reshape(-1, 4)  # float64 keeps the file's values exactly
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
    anns = data["annotations"]
    try:
        cols = _columns(anns, _ANNOTATION_KEYS)
        image_pos, image_found = _lookup(np.asarray(image_ids, dtype=np.int64), cols["image_id"])
        cat_pos, cat_found = _lookup(np.asarray(cat_ids, dtype=np.int64), cols["category_id"])
        area = [a.get("area", _NO_AREA) for a in anns]
        given = [i for i, v in enumerate(area) if v is not _NO_AREA]
        given_area = _columns([{"area": area[i]} for i in given], {"area": "num"})["area"]
        crowd = [a.get("iscrowd", 0) for a in anns]
        if not (image_found.all() and cat_found.all() and set(crowd) <= {0, 1}):  # True and 1.0 count as 1
            raise _Irregular
    except (_Irregular, TypeError, OverflowError):  # TypeError: an unhashable iscrowd
        _check_annotations(anns, path, set(image_ids), set(cat_ids))
        raise BadValueError(f"{path}: 'annotations' hold ids outside the 64-bit integer range") from None
    boxes = cols["bbox"]
    areas = boxes[:, 2] * boxes[:, 3]  # pycocotools' w * h where the file gives no area
    areas[given] = given_area
    columns = {
        "boxes": _coco_boxes(boxes, box_format),
        "labels": torch.from_numpy(cat_pos + 1),
        "iscrowd": torch.tensor(crowd, dtype=torch.int64),
        "area": torch.from_numpy(areas),
    }
    targets = _per_image(image_pos, len(image_ids), columns)  # file order within an image, as pycocotools'
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
    try:
        cols = _columns(data, _DETECTION_KEYS)
        image_pos, image_found = _lookup(np.asarray(gt.image_ids, dtype=np.int64), cols["image_id"])
        cat_pos, cat_found = _lookup(np.asarray(gt.category_ids, dtype=np.int64), cols["category_id"])
        if not (image_found.all() and cat_found.all()):
            raise _Irregular
    except (_Irregular, OverflowError):
        _check_detections(data, path, gt)
        raise BadValueError(f"{path}: ids outside the 64-bit integer range") from None
    columns = {
        "boxes": _coco_boxes(cols["bbox"], gt.box_format),
        "scores": torch.from_numpy(cols["score"]),
        "labels": torch.from_numpy(cat_pos + 1),
    }
    return _per_image(image_pos, len(gt.image_ids), columns)


def _check_annotations(anns: list, path: str, image_ids: set[int], cat_ids: set[int]) -> None:
    """Raise for the first malformed entry of a ground truth's 'annotations' (what :func:`_columns` found)."""
    for i, ann in enumerate(anns):
        where = f"{path}: annotations[{i}]"
        _check_entry(ann, _ANNOTATION_KEYS, where)
        if ann["image_id"] not in image_ids:
            raise BadValueError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in cat_ids:
            raise BadValueError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        if "area" in ann:
            _check_entry(ann, {"area": "num"}, where)
        if ann.get("iscrowd", 0) not in (0, 1):
            raise BadValueError(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")


def _check_detections(data: list, path: str, gt: CocoGroundTruth) -> None:
    """Raise for the first malformed entry of a results file, or name the image ids the ground truth lacks
    (what :func:`_columns` and the id lookups found)."""
    image_ids, cat_ids = set(gt.image_ids), set(gt.category_ids)
    unknown_images: set[int] = set()
    for i, det in enumerate(data):
        where = f"{path}: [{i}]"
        _check_entry(det, _DETECTION_KEYS, where)
        if det["image_id"] not in image_ids:
            unknown_images.add(det["image_id"])
        elif det["category_id"] not in cat_ids:
            raise BadValueError(f"{where}: category_id {det['category_id']} is not a category of {gt.path}")
    if unknown_images:
        some = sorted(unknown_images)[:10]
        raise BadValueError(
            f"{path}: {len(unknown_images)} image id(s) not in the ground truth {gt.path}: {some}"
        )


def write_metrics_json(metrics: dict[str, float], path: str | os.PathLike) -> None:
    """Write ``metrics`` as a flat JSON object, atomically (``training.checkpoint_io.atomic_write``)."""
    atomic_write_bytes(path, (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
