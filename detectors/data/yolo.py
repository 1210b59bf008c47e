"""YOLO (Ultralytics) detection datasets: ``data.yaml``, ``images/<split>/*.jpg``, ``labels/<split>/*.txt``.

``data.yaml`` (read with ``yaml.safe_load``) names the dataset root (``path``: optional, relative to the yaml's
folder; default that folder), the splits (``train``, ``val``, optional ``test``: each an image folder relative
to ``path``, searched recursively, a ``.txt`` list of image paths, or a list of either) and the classes
(``names``: a list, or a dict ``{0: name, ...}``). As in Ultralytics, an entry starting with ``../`` that does not
exist is tried without it (Roboflow's exports), and an image's labels are the file whose path replaces the
last ``/images/`` of the image's path by ``/labels/`` and its extension by ``.txt``. A missing or empty label
file is an image without objects.

A label row is ``class cx cy w h``, the box centre and size normalised to 0..1 by the image's width and height;
YOLO class ``c`` is label ``c + 1``. The image's size comes from its header (read once, here). An EXIF
orientation tag in the header is applied, as Ultralytics (OpenCV) and the browsers that annotation tools run in
show the image: the boxes are drawn on the upright image, and the sample is that image. Boxes become
XYXY absolute pixels once, here; corners within ``TOLERANCE`` outside the image (a writer's rounding) are
snapped to its edge, farther ones are clamped as the COCO reader clamps (a warning; ``strict`` makes it an
error), and so are zero-size boxes (dropped). A malformed row is an error naming the file and line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import yaml
from PIL import Image

from training.errors import BadFileError, BadValueError, MissingFileError
from training.images import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    find_images,
    is_image_file,
    open_header,
    open_image,
)

from .images import bad_images_message, header_errors
from .samples import BadSamplePolicy, BoxRepairLog, DetectionDataset, ImageRecord, check_inside_root

DATA_YAML = "data.yaml"
# Normalised values this far outside 0..1 are a writer's rounding, not a box outside the image: under a pixel
# for images up to 1,000 px, and above the rounding of writers with 3 or more decimals (5e-4).
TOLERANCE = 1e-3
# EXIF orientation -> the transpose that shows the image upright (the table of PIL's ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class YoloLayout:
    """A parsed ``data.yaml``: ``file`` the yaml, ``root`` the dataset root (``path``), ``names`` the classes in
    label order, ``splits`` the yaml's split entries (``train``, ``val``, ``test``, ...) as written."""

    file: str
    root: str
    names: list[str]
    splits: dict[str, object]


def read_data_yaml(path: str | os.PathLike) -> YoloLayout:
    """Read and check a ``data.yaml`` (``path``, ``names``, optional ``nc``); the split entries are checked when
    a split is read (:func:`split_images`)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file not found (a YOLO dataset's root holds data.yaml)") from None
    except OSError as e:  # a folder, no permission
        raise BadFileError(f"{path}: cannot be read as the YOLO dataset's data.yaml ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise BadValueError(f"{path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise BadValueError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise BadValueError(f"{path}: expected a mapping with keys path, train, val, names; got {data!r:.80}")
    names = _names(data, path)
    root = data.get("path") or "."
    if not isinstance(root, str):
        raise BadValueError(f"{path}: 'path' must be a folder name, got {root!r}")
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(root)))
    if not os.path.isdir(root):
        raise MissingFileError(f"{path}: 'path' names {root}, which is not a folder")
    splits = {k: v for k, v in data.items() if k not in ("path", "names", "nc")}
    return YoloLayout(path, root, names, splits)


def _names(data: dict, path: str) -> list[str]:
    """``names`` as a list in class order: a list, or a dict whose keys are 0..K-1."""
    if "names" not in data:
        raise BadValueError(f"{path}: missing key 'names' (the class names, in class index order)")
    names = data["names"]
    if isinstance(names, dict):
        try:
            by_index = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise BadValueError(f"{path}: 'names' keys must be class indices 0, 1, ..., got {list(names)}") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise BadValueError(f"{path}: 'names' keys must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
        names = [by_index[i] for i in range(len(by_index))]
    if not isinstance(names, list) or not names:
        raise BadValueError(f"{path}: 'names' must be a non-empty list or a dict {{0: name, ...}}, got {names!r}")
    if not all(isinstance(n, (str, int, float)) and not isinstance(n, bool) for n in names):
        raise BadValueError(f"{path}: every class name must be a string, got {names!r}")
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise BadValueError(f"{path}: class names must be unique, got {names}")
    if "nc" in data and data["nc"] != len(names):
        raise BadValueError(f"{path}: 'nc' is {data['nc']!r} but 'names' lists {len(names)} classes")
    return names


def split_images(layout: YoloLayout, split: str) -> list[str]:
    """The sorted image paths of ``split`` (a key of data.yaml): folders searched recursively, ``.txt`` lists
    read line by line (a relative line is relative to the list's folder and must stay inside the root)."""
    if split not in layout.splits:
        known = ", ".join(repr(k) for k, v in layout.splits.items() if isinstance(v, (str, list))) or "none"
        raise BadValueError(f"{layout.file}: no split {split!r} (its splits: {known}); set data.init_args."
                            "train_split/val_split/test_split to a key of data.yaml")  # fmt: skip
    entries = layout.splits[split]
    entries = entries if isinstance(entries, list) else [entries]
    paths: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise BadValueError(f"{layout.file}: {split!r} must name image folders or .txt lists, got {entry!r}")
        full = os.path.normpath(os.path.join(layout.root, os.path.expanduser(entry)))
        if not os.path.exists(full) and entry.startswith("../"):  # Ultralytics' fallback for Roboflow exports
            full = os.path.normpath(os.path.join(layout.root, entry[3:]))
        if os.path.isdir(full):
            paths += find_images(full, allow_empty=True)
        elif os.path.isfile(full) and full.endswith(".txt"):
            paths += _listed_images(full, layout.root)
        else:
            what = "is not a folder or a .txt list" if os.path.exists(full) else "does not exist"
            raise MissingFileError(f"{layout.file}: {split!r} names {full}, which {what}")
    if not paths:
        raise MissingFileError(f"{layout.file}: split {split!r} ({entries}) holds no image files")
    return sorted(paths)


def _listed_images(list_file: str, root: str) -> list[str]:
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise BadFileError(f"{list_file}: cannot be read as a list of images ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise BadValueError(f"{list_file}: not UTF-8 text ({e})") from None
    paths = []
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            continue
        where = f"{list_file}:{number}"
        if not is_image_file(name):
            raise BadValueError(f"{where}: {name!r} is not an image file name")
        full = os.path.normpath(os.path.join(os.path.dirname(list_file), name))
        check_inside_root(root, os.path.relpath(full, root) if not os.path.isabs(name) else name, where)
        paths.append(full)
    return paths


def label_path(image_path: str) -> str:
    """Ultralytics' rule: the last ``/images/`` of the path becomes ``/labels/``, the extension ``.txt``."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return os.path.splitext(labels.join(image_path.rsplit(images, 1)))[0] + ".txt"


def read_labels(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The rows of a label file: (classes int64[N] in 0..K-1, cxcywh float64[N, 4] in 0..1, line numbers).
    A missing file is no rows; a malformed row is an error naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as e:  # a folder, a file where a folder of the path should be, no permission
        raise BadFileError(f"{path}: cannot be read as a label file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise BadValueError(f"{path}: not UTF-8 text ({e})") from None
    classes, boxes, numbers = [], [], []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if fields:
            classes.append(_row(fields, num_classes, f"{path}:{number}", boxes))
            numbers.append(number)
    return np.array(classes, np.int64), np.array(boxes, np.float64).reshape(-1, 4), numbers


def _row(fields: list[str], num_classes: int, where: str, boxes: list) -> int:
    """One row's class; its box is appended to ``boxes``."""
    if len(fields) != 5:
        polygon = " (a segmentation polygon row: only boxes are read)" if len(fields) > 5 else ""
        raise BadValueError(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}{polygon}")
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise BadValueError(f"{where}: not a number in {' '.join(fields)!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise BadValueError(f"{where}: not a finite number in {' '.join(fields)!r}")
    cls = values[0]
    if not cls.is_integer() or not 0 <= cls < num_classes:
        raise BadValueError(f"{where}: class {fields[0]} is not a class index 0..{num_classes - 1} of 'names'")
    box = values[1:]
    if not all(-TOLERANCE <= v <= 1 + TOLERANCE for v in box):
        raise BadValueError(f"{where}: cx cy w h must be normalised to 0..1, got {' '.join(fields[1:])}")
    boxes.append(box)
    return int(cls)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) an open image's header declares, 1 where none. A PNG whose EXIF chunk
    follows the pixels would need them decoded to find it: taken as 1, as the header says nothing."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError):  # a corrupt EXIF block: the pixels may still be fine
        return 1
    return value if value in range(1, 9) else 1


def to_pixels(cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised ``[N, 4]`` cx cy w h -> XYXY absolute pixels (float64), corners within ``TOLERANCE`` outside
    0..1 snapped to the edge."""
    corners = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
    near = (corners >= -TOLERANCE) & (corners <= 1 + TOLERANCE)
    corners = np.where(near, corners.clip(0, 1), corners)
    return corners * np.array([width, height, width, height], np.float64)


class YoloDetection(DetectionDataset):
    """A split of a YOLO dataset: ``root`` holds ``data_yaml``; ``split`` is one of its keys (train, val, test).

    Image ids are positions in the sorted image list (``image_paths_of`` gives each id's file); labels are
    YOLO class + 1, and ``class_names`` are data.yaml's ``names``. An image whose header cannot be read is an
    error here with ``on_bad_sample="raise"`` (before any work); with "skip" it keeps its place, without a
    size or boxes, and is skipped with a warning naming it when loaded, like the other readers' images.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        data_yaml: str = DATA_YAML,
        transforms=None,
        strict: bool = False,
        on_bad_sample: BadSamplePolicy = "raise",
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.layout = read_data_yaml(os.path.join(os.fspath(root), data_yaml))
        self.split = split
        paths = split_images(self.layout, split)
        sizes, self.orientations = self._sizes(paths, on_bad_sample, max_image_pixels)
        repairs = BoxRepairLog(f"{self.layout.file} split {split!r}", strict)
        records = [self._record(i, p, s, repairs) for i, (p, s) in enumerate(zip(paths, sizes, strict=True))]
        repairs.report()
        super().__init__(records, self.layout.names, transforms, on_bad_sample, max_image_pixels)

    @staticmethod
    def _sizes(paths: list[str], on_bad_sample: str, max_pixels: int | None) -> tuple[list, list[int]]:
        """(upright (width, height) of each image from its header, or None where it cannot be read: an error
        with "raise", naming the first five; EXIF orientation of each, 1 where none)."""
        sizes: list[tuple[int, int] | None] = []
        orientations, errors = [], []
        for path in paths:
            try:
                with open_header(path, max_pixels) as img:
                    orientation = _orientation(img)
                    width, height = img.size
            except BadImageError as e:
                sizes.append(None)
                orientations.append(1)
                errors.append(str(e))
                continue
            sizes.append((height, width) if orientation in (5, 6, 7, 8) else (width, height))
            orientations.append(orientation)
        if errors and on_bad_sample == "raise":
            raise BadImageError(f"{bad_images_message(errors, len(paths))}; fix or remove them, or set "
                                "data.init_args.on_bad_sample skip to go on without them")  # fmt: skip
        return sizes, orientations

    def open_image(self, rec: ImageRecord) -> Image.Image:
        """The record's image, upright as its EXIF orientation says (the frame of its labels)."""
        img = open_image(rec.path, self.max_image_pixels)
        method = UPRIGHT.get(self.orientations[rec.image_id])
        return img.transpose(method) if method is not None else img

    def header_errors(self) -> dict[int, str]:
        """index -> why the image cannot be read, from the headers alone; the sizes are the headers' own (turned
        upright), so only the readability is checked."""
        return header_errors([r.path for r in self.records], self.max_image_pixels)

    def _record(self, index: int, path: str, size: tuple[int, int] | None, repairs: BoxRepairLog) -> ImageRecord:
        labels_file = label_path(path)
        classes, cxcywh, numbers = read_labels(labels_file, len(self.layout.names))
        if size is None:  # unreadable: loading it raises, and the bad-sample policy decides
            return ImageRecord(path=path, image_id=index, width=0, height=0)
        width, height = size
        boxes = to_pixels(cxcywh, width, height)
        keep = repairs.repair(boxes, width, height, [f"{labels_file}:{n}" for n in numbers])
        boxes = boxes[keep].astype(np.float32)
        return ImageRecord(
            path=path,
            image_id=index,
            width=width,
            height=height,
            boxes=boxes,
            labels=classes[keep] + 1,
            area=((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32),
            iscrowd=np.zeros(len(boxes), np.int64),
        )
