"""Pascal VOC detection datasets: ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/<split>.txt``.

The image of split entry ``<id>`` is ``JPEGImages/<id>.jpg`` (Pascal VOC's own naming) or, when that file
does not exist, ``JPEGImages/<filename>`` from the XML (VOC-style data with PNG or other names).

XML is parsed with the standard library. VOC boxes are 1-based inclusive pixel
indices; they become 0-based pixel-edge XYXY boxes as in Detectron2:
``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax``. ``difficult`` is kept
(the VOC evaluator ignores those objects).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET

import numpy as np

from training.errors import BadValueError, MissingFileError
from training.images import DEFAULT_MAX_PIXELS

from .samples import BadSamplePolicy, BoxRepairLog, DetectionDataset, ImageRecord, check_inside_root

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def _text(elem: ET.Element, tag: str, where: str) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise BadValueError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(elem: ET.Element, tag: str, where: str) -> float:
    text = _text(elem, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise BadValueError(f"{where}: <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):  # float() reads "nan" and "inf"; a box made of them is no box (COCO refuses it)
        raise BadValueError(f"{where}: <{tag}> is not a finite number: {text!r}")
    return value


def _voc_box(obj: ET.Element, where: str) -> list[float]:
    """An <object>'s <bndbox> (1-based inclusive corners) as a 0-based pixel-edge XYXY box."""
    bnd = obj.find("bndbox")
    if bnd is None:
        raise BadValueError(f"{where}: missing <bndbox>")
    xmin, ymin, xmax, ymax = (_number(bnd, t, f"{where} <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax"))
    return [xmin - 1, ymin - 1, xmax, ymax]


def read_split(root: str, split: str) -> list[str]:
    """The image ids listed in ``ImageSets/Main/<split>.txt`` (first word of each non-empty line)."""
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.split()[0] for line in f if line.strip()]
    except FileNotFoundError:
        layout = "VOC layout: ImageSets/Main/<split>.txt"
        raise MissingFileError(f"{path}: split file not found ({layout})") from None


class VOCDetection(DetectionDataset):
    """A Pascal VOC split under ``root`` (e.g. ``VOCdevkit/VOC2012``).

    ``classes`` defines labels 1..K in order (default: the 20 VOC classes); an
    object whose name is not listed is an error naming the XML file. Image ids are
    positions in the split file; ``image_names`` keeps the VOC ids.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        classes: list[str] | None = None,
        transforms=None,
        keep_difficult: bool = True,
        strict: bool = False,
        on_bad_sample: BadSamplePolicy = "raise",
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.root = os.fspath(root)
        self.split = split
        class_names = list(classes) if classes is not None else list(VOC_CLASSES)
        self.image_names = read_split(self.root, split)
        label_of = {name: i + 1 for i, name in enumerate(class_names)}
        repairs = BoxRepairLog(os.path.join(self.root, "Annotations"), strict)
        records = [
            self._parse(i, name, label_of, keep_difficult, repairs) for i, name in enumerate(self.image_names)
        ]
        repairs.report()
        super().__init__(records, class_names, transforms, on_bad_sample, max_image_pixels)

    def _image_path(self, name: str, ann: ET.Element, xml_path: str) -> str:
        # Pascal VOC's own files are always JPEGImages/<id>.jpg (torchvision's rule); VOC-style data from
        # annotation tools may hold other formats, named by the XML's <filename>. A missing file is reported
        # when the image is read (raise/skip policy), naming the path.
        images = os.path.join(self.root, "JPEGImages")
        default = check_inside_root(images, f"{name}.jpg", xml_path)
        given = ann.findtext("filename", "").strip()
        if given and not os.path.isfile(default):
            return check_inside_root(images, given, xml_path)
        return default

    def _parse(self, index: int, name: str, label_of: dict, keep_difficult: bool, repairs) -> ImageRecord:
        """The record of split entry ``name`` (image id ``index``) from ``Annotations/<name>.xml``."""
        split_file = os.path.join(self.root, "ImageSets", "Main", f"{self.split}.txt")
        xml_path = check_inside_root(os.path.join(self.root, "Annotations"), f"{name}.xml", split_file)
        try:
            ann = ET.parse(xml_path).getroot()
        except FileNotFoundError:
            raise MissingFileError(f"{xml_path}: annotation file not found") from None
        except ET.ParseError as e:
            raise BadValueError(f"{xml_path}: malformed XML ({e})") from None
        size = ann.find("size")
        if size is None:
            raise BadValueError(f"{xml_path}: missing <size>")
        width = int(_number(size, "width", f"{xml_path}: <size>"))
        height = int(_number(size, "height", f"{xml_path}: <size>"))
        if width <= 0 or height <= 0:
            raise BadValueError(f"{xml_path}: <size> must be positive, got {width}x{height}")
        boxes, labels, difficult, ids = [], [], [], []
        for j, obj in enumerate(ann.findall("object")):
            where = f"{xml_path}: <object> #{j + 1}"
            cls = _text(obj, "name", where)
            if cls not in label_of:
                raise BadValueError(f"{where}: class {cls!r} is not in classes {list(label_of)}")
            is_difficult = obj.find("difficult") is not None and _text(obj, "difficult", where) == "1"
            if is_difficult and not keep_difficult:
                continue
            boxes.append(_voc_box(obj, where))
            labels.append(label_of[cls])
            difficult.append(is_difficult)
            ids.append(f"{name}.xml object #{j + 1}")
        boxes_np = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        keep = repairs.repair(boxes_np, width, height, ids)
        boxes_np = boxes_np[keep].astype(np.float32)
        return ImageRecord(
            path=self._image_path(name, ann, xml_path),
            image_id=index,
            width=width,
            height=height,
            boxes=boxes_np,
            labels=np.array(labels, np.int64)[keep],
            area=((boxes_np[:, 2] - boxes_np[:, 0]) * (boxes_np[:, 3] - boxes_np[:, 1])).astype(np.float32),
            iscrowd=np.zeros(len(boxes_np), np.int64),
            difficult=np.array(difficult, bool)[keep],
        )
