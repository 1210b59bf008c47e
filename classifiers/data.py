"""Image-folder classification data: ``root/<class name>/*.png`` or a glob pattern.

Files are found with ``find_images`` (the lesson's ``glob.glob``) and read with
``load_image`` (Keras ``load_img``). Class names are the parent folder names,
sorted, so label i is ``class_names[i]``.
"""

from __future__ import annotations

import os
import warnings

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from training.images import BadImageError, find_images, is_image_file, load_image


def _class_of(path: str, root: str | None) -> str:
    if root is not None:
        return os.path.relpath(path, root).split(os.sep)[0]
    return os.path.basename(os.path.dirname(path))


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs from a class-per-folder tree.

    Args:
        root_or_pattern: a directory whose sub-folders are classes, or a glob pattern
            (``"data/*/train/*.jpg"``) whose files' parent folders are the classes.
        classes: fix the class list (and order); default: the sorted folder names.
        image_size: ``(height, width)`` passed to ``load_image`` (None keeps file size).
        color_mode, interpolation: as Keras ``load_img``.
        transform: applied to the PIL image; default converts to float32 [C, H, W] in [0, 1].
        on_bad_sample: "raise" (default) or "skip" (warn naming the file, return None).

    Empty class folders and patterns that match nothing raise ``FileNotFoundError``
    naming the path.
    """

    def __init__(
        self,
        root_or_pattern: str | os.PathLike,
        classes: list[str] | None = None,
        image_size: tuple[int, int] | None = None,
        color_mode: str = "rgb",
        interpolation: str = "bilinear",
        transform=None,
        on_bad_sample: str = "raise",
    ):
        spec = os.fspath(root_or_pattern)
        root = spec if os.path.isdir(spec) else None
        self.paths = find_images(spec)
        if root is not None:
            root = os.path.normpath(root)
            self.paths = [p for p in self.paths if os.path.dirname(os.path.relpath(p, root))]  # skip loose files
            for entry in sorted(os.scandir(root), key=lambda e: e.name):
                if entry.is_dir() and not any(is_image_file(p) for _, _, fs in os.walk(entry.path) for p in fs):
                    raise FileNotFoundError(f"{entry.path}: class folder contains no images")
        found = sorted({_class_of(p, root) for p in self.paths})
        if not found:
            raise FileNotFoundError(f"{spec}: no images inside class sub-folders")
        self.class_names = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.class_names)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise ValueError(f"{spec}: folders {unknown} are not in classes {self.class_names}")
        self.labels = [index[_class_of(p, root)] for p in self.paths]
        self.image_size = tuple(image_size) if image_size is not None else None
        self.color_mode, self.interpolation = color_mode, interpolation
        self.transform = transform or v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            img = load_image(path, self.image_size, self.color_mode, self.interpolation)
            img.load()
            return img
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(f"{path}: not a readable image ({e})") from e

    def __getitem__(self, index: int):
        try:
            img = self.load(index)
        except BadImageError as e:
            if self.on_bad_sample == "raise":
                raise
            warnings.warn(f"skipping bad sample {index}: {e}", stacklevel=2)
            return None
        return self.transform(img), self.labels[index]
