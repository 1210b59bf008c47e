"""Image files without annotations, for prediction: ``--data.init_args.predict_images 'photos/*.jpg'``.

:class:`ImageFileDataset` yields the files of a directory, glob pattern or list in sorted order, each with
its position in that order as image id; ``DetectionDataModule`` builds it for ``predict_images``, and
``detectors.predict.CocoPredictionWriter`` writes its detections. :func:`image_paths_of` gives the writer
image id -> file path for it and for the annotated datasets (``detectors.data.samples.DetectionDataset``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from training.errors import BadValueError
from training.images import DEFAULT_MAX_PIXELS, BadImageError, find_images, open_header, open_image

__all__ = ["ImageFileDataset", "bad_images_message", "header_errors", "image_paths_of"]


def header_errors(
    paths: Sequence[str], max_pixels: int | None, sizes: Sequence[tuple[int, int]] | None = None
) -> dict[int, str]:
    """index -> why, for each of ``paths`` that cannot be an input as far as its header tells (missing, not
    an image, over ``max_pixels``, or a (width, height) other than ``sizes[index]``); nothing is decoded, so
    a whole split is checked in a moment. A truncated file passes and fails when decoded."""
    errors = {}
    for index, path in enumerate(paths):
        try:
            with open_header(path, max_pixels) as img:
                size = img.size
        except BadImageError as e:
            errors[index] = str(e)
            continue
        if sizes is not None and size != tuple(sizes[index]):
            errors[index] = size_error(path, size, sizes[index])
    return errors


def size_error(path: str, size: tuple[int, int], declared: tuple[int, int]) -> str:
    return f"{path}: image is {size[0]}x{size[1]} but the annotations declare {declared[0]}x{declared[1]}"


def bad_images_message(reasons: Sequence[str], total: int, shown: int = 5) -> str:
    """One line: how many of ``total`` images are bad, and the first ``shown`` reasons (each names a file)."""
    more = f"; and {len(reasons) - shown} more" if len(reasons) > shown else ""
    return f"{len(reasons)} of {total} images cannot be read: " + "; ".join(reasons[:shown]) + more


class ImageFileDataset(Dataset):
    """Image files without annotations, for prediction.

    Args:
        images: a directory (searched recursively), a glob pattern or a list of paths
            (see ``training.images.find_images``); image ids are positions in the sorted list.
        class_names: the classes the detections will be named by (optional, informational).
        label_to_cat_id: category id of each label when the classes come from a COCO file; None: the
            label is the id.
        on_bad_sample: "raise" stops at an unreadable file naming it; "skip" warns and yields None
            (``collate_detection`` drops it). ``defer_bad_samples`` (set by ``DetectionDataModule`` for
            ``predict`` after its check of every header): a file failing only when decoded yields None
            even with "raise", and ``detectors.predict.CocoPredictionWriter`` raises naming it after writing
            the other images' results.
        max_image_pixels: larger images are refused as decompression bombs (``training.images.open_image``).

    ``__getitem__(i)`` returns ``(image, target)``: image ``tv_tensors.Image`` float32 ``[3, H, W]`` in
    0..1, target ``{"image_id": i, "path": path}``.
    """

    def __init__(
        self,
        images: str | os.PathLike | Sequence[str],
        class_names: Sequence[str] | None = None,
        label_to_cat_id: dict[int, int] | None = None,
        on_bad_sample: str = "raise",
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if on_bad_sample not in ("raise", "skip"):
            raise BadValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        if isinstance(images, (str, os.PathLike)):
            self.paths = find_images(images)
        else:
            self.paths = [os.fspath(p) for p in images]
            if not self.paths:
                raise BadValueError("ImageFileDataset: the list of image paths is empty")
        self.class_names = list(class_names) if class_names is not None else None
        self.label_to_cat_id = dict(label_to_cat_id) if label_to_cat_id is not None else None
        self.on_bad_sample = on_bad_sample
        self.defer_bad_samples = False
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def header_errors(self) -> dict[int, str]:
        """index -> why the file cannot be read, from the headers alone (:func:`header_errors`)."""
        return header_errors(self.paths, self.max_image_pixels)

    def image_id(self, index: int) -> int:
        return index

    def read_error(self, index: int) -> str | None:
        """Why file ``index`` cannot be read (decoded in full), or None."""
        try:
            open_image(self.paths[index], self.max_image_pixels)
        except BadImageError as e:
            return str(e)
        return None

    def image_paths(self) -> dict[int, str]:
        return dict(enumerate(self.paths))

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            img = open_image(path, self.max_image_pixels)
        except BadImageError as e:
            if self.on_bad_sample == "raise" and not self.defer_bad_samples:
                raise
            warnings.warn(f"skipping bad image {index}: {e}", stacklevel=2)
            return None
        image = F.to_dtype(tv_tensors.Image(F.pil_to_tensor(img)), torch.float32, scale=True)
        return image, {"image_id": index, "path": path}


def image_paths_of(dataset: Any) -> dict[int, str]:
    """image id -> file path for the datasets this project has (``records`` or ``image_paths()``)."""
    if hasattr(dataset, "image_paths"):
        return dataset.image_paths()
    if hasattr(dataset, "records"):
        return {int(r.image_id): r.path for r in dataset.records}
    return {}
