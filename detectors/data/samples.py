"""What COCO, VOC and YOLO have in common once parsed: a list of images with their boxes.

Format readers (``coco.py``, ``voc.py``, ``yolo.py``) only parse and validate files into
``ImageRecord`` lists; this module turns a record into a training sample, repairs
box anomalies once, applies the one bad-sample policy, and writes records back out as
COCO ground truth (``to_coco``) for data without a COCO file.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from training.errors import BadValueError
from training.images import DEFAULT_MAX_PIXELS, BadImageError, open_image

from .images import header_errors, size_error

log = logging.getLogger("litvision")

BadSamplePolicy = Literal["raise", "skip"]


@dataclass
class ImageRecord:
    """One image and its objects, boxes already XYXY absolute pixels."""

    path: str
    image_id: int
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [N, 4] XYXY
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # [N] 1..K
    area: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))  # [N]
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # [N]
    difficult: np.ndarray | None = None  # [N] bool, VOC only


class BoxRepairLog:
    """Collects box repairs during parsing and reports them in one warning (or raises when strict)."""

    def __init__(self, source: str, strict: bool):
        self.source, self.strict = source, strict
        self.clamped: list[str] = []
        self.dropped: list[str] = []

    def repair(self, boxes: np.ndarray, width: int, height: int, ids: list[str]) -> np.ndarray:
        """Clamp XYXY ``boxes`` to the image and return the mask of boxes with positive width and height.

        The same repair torchvision's detection reference scripts apply to COCO.
        """
        if len(boxes) == 0:
            return np.zeros((0,), bool)
        clamped = boxes.copy()
        clamped[:, 0::2] = clamped[:, 0::2].clip(0, width)
        clamped[:, 1::2] = clamped[:, 1::2].clip(0, height)
        keep = (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])
        moved = (np.abs(clamped - boxes) > 0).any(axis=1)
        for i, ident in enumerate(ids):
            if not keep[i]:
                self.dropped.append(ident)
            elif moved[i]:
                self.clamped.append(ident)
        if self.strict and (self.dropped or self.clamped):
            bad = self.dropped or self.clamped
            what = "has non-positive width or height" if self.dropped else "extends outside the image"
            raise BadValueError(f"{self.source}: {bad[0]} {what} (strict=True; use strict=False to repair)")
        boxes[:] = clamped
        return keep

    def report(self) -> None:
        """One warning for every repair so far (naming the first five boxes of each kind), if any."""
        parts = []
        if self.dropped:
            first = ", ".join(self.dropped[:5])
            parts.append(f"dropped {len(self.dropped)} degenerate boxes (first: {first})")
        if self.clamped:
            first = ", ".join(self.clamped[:5])
            parts.append(f"clamped {len(self.clamped)} boxes to the image (first: {first})")
        if parts:
            message = f"{self.source}: " + "; ".join(parts) + " (strict=True makes these errors)"
            warnings.warn(message, stacklevel=3)


def check_inside_root(root: str, file_name: str, source: str) -> str:
    """Join ``file_name`` to ``root`` and refuse names that would resolve outside it.

    The check is lexical (normpath), so symlinks a user placed inside the root keep working.
    """
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")):
        raise BadValueError(
            f"{source}: refusing absolute image path {file_name!r}; file names must be relative"
        )
    root_n = os.path.normpath(root)
    full = os.path.normpath(os.path.join(root_n, file_name))
    if os.path.commonpath([os.path.abspath(root_n), os.path.abspath(full)]) != os.path.abspath(root_n):
        raise BadValueError(
            f"{source}: refusing image file_name {file_name!r}: it resolves outside {root_n}"
        )
    return full


class DetectionDataset(Dataset):
    """Base dataset: ``records`` in, ``(image, target)`` out.

    ``__getitem__`` returns:
        image: ``tv_tensors.Image`` float32 [3, H, W] in [0, 1] (after ``transforms``)
        target: ``boxes`` BoundingBoxes[N, 4] XYXY absolute pixels, ``labels`` int64[N] in 1..K,
            ``image_id`` int, ``area`` float32[N], ``iscrowd`` int64[N] and, for VOC, ``difficult`` bool[N].
    With ``on_bad_sample="skip"``, an unreadable image yields ``None`` (with a warning naming
    the file); ``collate_detection`` drops it from the batch.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        class_names: list[str],
        transforms=None,
        on_bad_sample: BadSamplePolicy = "raise",
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if on_bad_sample not in ("raise", "skip"):
            raise BadValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        self.records = records
        self.class_names = list(class_names)
        self.transforms = transforms
        self.on_bad_sample = on_bad_sample
        self.defer_bad_samples = False
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.records)

    def header_errors(self) -> dict[int, str]:
        """index -> why the image cannot be read, from the headers alone (``images.header_errors``)."""
        sizes = [(r.width, r.height) for r in self.records]
        return header_errors([r.path for r in self.records], self.max_image_pixels, sizes)

    def image_id(self, index: int) -> int:
        return int(self.records[index].image_id)

    def read_error(self, index: int) -> str | None:
        """Why sample ``index``'s image cannot be read (decoded in full, size checked), or None."""
        try:
            self.load(index)
        except BadImageError as e:
            return str(e)
        return None

    @property
    def num_classes(self) -> int:
        """Number of classes including background (what torchvision's ``num_classes`` means)."""
        return len(self.class_names) + 1

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, read from the annotations (no image is opened)."""
        return [r.width / r.height if r.height else 1.0 for r in self.records]  # 0: size unknown (YOLO)

    def to_coco(self, image_ids: Sequence[int] | None = None) -> dict:
        """The records of ``image_ids`` (default: all) as a COCO instances dict, for scoring predictions of
        data without a COCO file (VOC, YOLO) with ``train.py evaluate``: category id = label, unless the
        dataset maps labels to ids (``label_to_cat_id``); bbox ``[x, y, w, h]`` from the XYXY boxes (float64,
        where ``x + w`` gives ``x2`` back); ``area`` and ``iscrowd`` as the records hold them."""
        to_id = getattr(self, "label_to_cat_id", None) or {k: k for k in range(1, len(self.class_names) + 1)}
        wanted = None if image_ids is None else set(image_ids)
        images, annotations = [], []
        for r in self.records:
            if wanted is not None and int(r.image_id) not in wanted:
                continue
            images.append({"id": int(r.image_id), "file_name": r.path, "width": r.width, "height": r.height})
            xyxy = np.asarray(r.boxes, np.float64).reshape(-1, 4)
            xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
            for box, label, area, crowd in zip(xywh.tolist(), r.labels.tolist(), r.area.tolist(),
                                               r.iscrowd.tolist(), strict=True):  # fmt: skip
                annotations.append({"id": len(annotations) + 1, "image_id": int(r.image_id),
                                    "category_id": to_id[int(label)], "bbox": box, "area": float(area),
                                    "iscrowd": int(crowd)})  # fmt: skip
        categories = [{"id": to_id[k], "name": n} for k, n in enumerate(self.class_names, start=1)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def open_image(self, rec: ImageRecord) -> Image.Image:
        """The record's image, 8-bit RGB, in the frame its boxes are in (a reader whose files need more, such
        as YOLO's EXIF orientation, overrides it); raises BadImageError naming the file."""
        return open_image(rec.path, self.max_image_pixels)

    def load(self, index: int) -> tuple[tv_tensors.Image, dict]:
        """Sample ``index`` before ``transforms``: the uint8[3, H, W] image and its target (class docstring);
        raises BadImageError for a file that cannot be read or whose size differs from the annotations."""
        rec = self.records[index]
        img = self.open_image(rec)
        if img.size != (rec.width, rec.height):
            raise BadImageError(size_error(rec.path, img.size, (rec.width, rec.height)))
        image = tv_tensors.Image(F.pil_to_tensor(img))
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.as_tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(rec.height, rec.width),
            ),
            "labels": torch.as_tensor(rec.labels, dtype=torch.int64),
            "image_id": rec.image_id,
            "area": torch.as_tensor(rec.area, dtype=torch.float32),
            "iscrowd": torch.as_tensor(rec.iscrowd, dtype=torch.int64),
        }
        if rec.difficult is not None:
            target["difficult"] = torch.as_tensor(rec.difficult, dtype=torch.bool)
        return image, target

    def __getitem__(self, index: int):
        try:
            image, target = self.load(index)
        except BadImageError as e:
            if self.on_bad_sample == "raise" and not self.defer_bad_samples:
                raise
            warnings.warn(f"skipping bad sample {index}: {e}", stacklevel=2)
            return None
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        else:
            image = F.to_dtype(image, torch.float32, scale=True)
        return image, target


def collate_detection(batch):
    """Keep variable-size images: ``(images, targets)`` tuples; samples skipped as bad are dropped."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return (), ()
    return tuple(zip(*batch, strict=True))
