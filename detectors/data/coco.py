"""COCO detection datasets (``instances_*.json``) read through pycocotools.

The file is validated before pycocotools indexes it, so a structural error names
the file and the offending image or annotation id instead of surfacing later as a
``KeyError`` in a worker. COCO's ``[x, y, w, h]`` boxes are converted to XYXY once,
here; category ids are mapped to contiguous labels 1..K in ascending id order.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from numbers import Number

import numpy as np
from pycocotools.coco import COCO

from training.errors import BadValueError, MissingFileError
from training.images import DEFAULT_MAX_PIXELS

from .samples import BadSamplePolicy, BoxRepairLog, DetectionDataset, ImageRecord, check_inside_root


def read_json(path: str | os.PathLike) -> object:
    """A JSON file, or an error naming it (and the line and column of a syntax error)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise MissingFileError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise BadValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise BadValueError(f"{path}: not UTF-8 text ({e})") from e


def _require(entry: dict, keys: dict[str, type | tuple], where: str) -> None:
    for key, kind in keys.items():
        if key not in entry:
            raise BadValueError(f"{where}: missing key {key!r}")
        value = entry[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadValueError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def read_coco_categories(annotation_file: str | os.PathLike, data: object = None) -> list[dict]:
    """The ``categories`` list of a COCO file (or of its already parsed ``data``), sorted by id (what
    defines labels 1..K)."""
    path = os.fspath(annotation_file)
    data = read_json(path) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise BadValueError(f"{path}: expected a JSON object with a 'categories' list")
    cats = []
    for i, cat in enumerate(data["categories"]):
        where = f"{path}: categories[{i}]"
        if not isinstance(cat, dict):
            raise BadValueError(f"{where}: expected an object, got {cat!r}")
        _require(cat, {"id": int, "name": str}, where)
        cats.append({"id": cat["id"], "name": cat["name"]})
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise BadValueError(f"{path}: duplicate category ids in 'categories': {sorted(ids)}")
    return sorted(cats, key=lambda c: c["id"])


class CocoDetection(DetectionDataset):
    """A COCO detection split: ``image_root`` holds the images, ``annotation_file`` the instances JSON.

    Attributes:
        coco: the pycocotools ``COCO`` index of the (validated) file, built on first use.
        cat_ids: COCO category ids in label order (``cat_ids[label - 1]``).
        cat_id_to_label / label_to_cat_id: the id mapping both ways.
        class_names: category names in label order.

    Crowd annotations are kept with ``iscrowd=1`` (the evaluator needs them; the
    detection module leaves them out of the training loss). Boxes outside the image
    are clamped and boxes with non-positive size dropped, with one summary warning;
    ``strict=True`` makes these errors instead.
    """

    def __init__(
        self,
        image_root: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms=None,
        strict: bool = False,
        on_bad_sample: BadSamplePolicy = "raise",
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.image_root = os.fspath(image_root)
        self.annotation_file = os.fspath(annotation_file)
        data = read_json(self.annotation_file)
        categories = read_coco_categories(self.annotation_file, data)
        self.cat_ids = [c["id"] for c in categories]
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = {label: cid for cid, label in self.cat_id_to_label.items()}
        records = self._parse(data, strict)
        class_names = [c["name"] for c in categories]
        super().__init__(records, class_names, transforms, on_bad_sample, max_image_pixels)
        self._coco: COCO | None = None

    @property
    def coco(self) -> COCO:
        """The pycocotools index of the file, built on first use: training never needs it, and a copy of
        instances_train2017.json (segmentations included) in every DataLoader worker would cost GBs."""
        if self._coco is None:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self._coco = COCO(self.annotation_file)
        return self._coco

    def _parse(self, data: dict, strict: bool) -> list[ImageRecord]:
        """One record per declared image, in file order, with its annotations' boxes repaired (or refused)."""
        path = self.annotation_file
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise BadValueError(f"{path}: expected a list under {key!r}")
        images = self._check_images(data["images"])
        per_image: dict[int, list[dict]] = {iid: [] for iid in images}
        for i, ann in enumerate(data["annotations"]):
            self._check_annotation(i, ann, images)
            per_image[ann["image_id"]].append(ann)
        repairs = BoxRepairLog(path, strict)
        records = [self._record(img, per_image[iid], repairs) for iid, img in images.items()]
        repairs.report()
        return records

    def _check_images(self, entries: list) -> dict[int, dict]:
        """The ``images`` entries by id, each checked: id, file name inside ``image_root``, positive size."""
        images: dict[int, dict] = {}
        for i, img in enumerate(entries):
            where = f"{self.annotation_file}: images[{i}]"
            if not isinstance(img, dict):
                raise BadValueError(f"{where}: expected an object, got {img!r}")
            _require(img, {"id": int, "file_name": str, "width": int, "height": int}, where)
            where = f"{self.annotation_file}: image id {img['id']}"
            if img["id"] in images:
                raise BadValueError(f"{where}: duplicate image id")
            if img["width"] <= 0 or img["height"] <= 0:
                size = f"{img['width']}x{img['height']}"
                raise BadValueError(f"{where}: width and height must be positive, got {size}")
            check_inside_root(self.image_root, img["file_name"], where)
            images[img["id"]] = img
        return images

    def _check_annotation(self, index: int, ann: object, images: dict[int, dict]) -> None:
        """Refuse annotation ``index`` unless it names a declared image and category and has a finite bbox."""
        where = f"{self.annotation_file}: annotations[{index}]"
        if not isinstance(ann, dict):
            raise BadValueError(f"{where}: expected an object, got {ann!r}")
        where = f"{self.annotation_file}: annotation id {ann.get('id', f'at index {index}')}"
        _require(ann, {"id": int, "image_id": int, "category_id": int, "bbox": list}, where)
        if ann["image_id"] not in images:
            raise BadValueError(f"{where}: image_id {ann['image_id']} is not declared in 'images'")
        if ann["category_id"] not in self.cat_id_to_label:
            raise BadValueError(
                f"{where}: category_id {ann['category_id']} is not declared in 'categories' "
                f"(declared: {self.cat_ids})"
            )
        bbox = ann["bbox"]
        if len(bbox) != 4 or not all(isinstance(v, Number) and math.isfinite(v) for v in bbox):
            raise BadValueError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")

    def _record(self, img: dict, anns: list[dict], repairs: BoxRepairLog) -> ImageRecord:
        """One image's record: COCO ``[x, y, w, h]`` boxes become XYXY, repaired; dropped boxes take their
        label, area and crowd flag with them."""
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        keep = repairs.repair(boxes, img["width"], img["height"], [f"annotation id {a['id']}" for a in anns])
        kept = [a for a, k in zip(anns, keep, strict=True) if k]
        return ImageRecord(
            path=check_inside_root(self.image_root, img["file_name"], self.annotation_file),
            image_id=img["id"],
            width=img["width"],
            height=img["height"],
            boxes=boxes[keep].astype(np.float32),
            labels=np.array([self.cat_id_to_label[a["category_id"]] for a in kept], np.int64),
            area=np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in kept], np.float32),
            iscrowd=np.array([int(a.get("iscrowd", 0)) for a in kept], np.int64),
        )
