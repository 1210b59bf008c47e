"""Image-folder classification data: ``root/<class name>/*.png`` or a glob pattern.

Files are found with ``find_images`` (``glob.glob``, as the Keras recipe lists them) and read
with ``load_image`` (Keras ``load_img``). Class names are the parent folder names,
sorted, so label i is ``class_names[i]``.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision.transforms import v2

from training.distributed import evaluation_sampler
from training.errors import BadValueError, MissingFileError
from training.images import BadImageError, find_images, is_image_file, load_image


def _class_of(path: str, root: str | None) -> str:
    if root is not None:
        return os.path.relpath(path, root).split(os.sep)[0]
    return os.path.basename(os.path.dirname(path))


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs from a class-per-folder tree.

    Args:
        root_or_pattern: a directory whose sub-folders are classes, or a glob pattern
            (``"data/train/*/*.jpg"``) whose files' parent folders are the classes.
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
                if entry.name.startswith("."):  # .ipynb_checkpoints and the like are not classes
                    continue
                if entry.is_dir() and not any(is_image_file(p) for _, _, fs in os.walk(entry.path) for p in fs):
                    raise MissingFileError(f"{entry.path}: class folder contains no images")
        found = sorted({_class_of(p, root) for p in self.paths})
        if not found:
            raise MissingFileError(f"{spec}: no images inside class sub-folders")
        self.class_names = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.class_names)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise BadValueError(f"{spec}: folders {unknown} are not in classes {self.class_names}")
        self.labels = [index[_class_of(p, root)] for p in self.paths]
        self.image_size = tuple(image_size) if image_size is not None else None
        self.color_mode, self.interpolation = color_mode, interpolation
        self.transform = transform or v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        if on_bad_sample not in ("raise", "skip"):
            raise BadValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
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


class ImageFolderDataModule(L.LightningDataModule):
    """Classification data from class folders (``root/<class>/*``) or a glob pattern.

    Args:
        root: directory of class folders, or a glob pattern (class = parent folder name).
        val_root: separate validation folder/pattern; without it ``val_split`` of ``root`` is held out
            (stratified per class, seeded).
        image_size: ``(height, width)`` the images are resized to (Keras ``target_size``).
        color_mode: "rgb" or "grayscale" (grayscale is repeated to 3 channels for the backbone).
        augment: random-resized-crop + horizontal flip for training.
        on_bad_sample: "raise" or "skip" an unreadable image (named in the error/warning).
    Images come out as float ``[3, H, W]`` in 0..1; the classifier normalises them itself.
    """

    def __init__(
        self,
        root: str = "data/shapes/classification/train",
        val_root: str | None = "data/shapes/classification/val",
        val_split: float = 0.2,
        image_size: tuple[int, int] = (64, 64),
        color_mode: Literal["rgb", "grayscale"] = "rgb",
        augment: bool = True,
        batch_size: int = 32,
        num_workers: int = 2,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < val_split < 1 and val_root is None:
            raise BadValueError(f"val_split must be in (0, 1) when there is no val_root, got {val_split}")
        self.save_hyperparameters()
        self._class_names: list[str] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = ImageFolderDataset(self.hparams.root).class_names
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _transform(self, train: bool):
        h, w = self.hparams.image_size
        steps: list = [v2.ToImage()]
        if self.hparams.color_mode == "grayscale":
            steps.append(v2.Grayscale(num_output_channels=3))
        if train and self.hparams.augment:
            steps += [v2.RandomResizedCrop((h, w), scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True)])

    def _dataset(self, spec: str, train: bool) -> ImageFolderDataset:
        hp = self.hparams
        return ImageFolderDataset(spec, classes=self.class_names, image_size=hp.image_size,
                                  color_mode=hp.color_mode, transform=self._transform(train),
                                  on_bad_sample=hp.on_bad_sample)  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        train_full = self._dataset(hp.root, train=True)
        if hp.val_root is not None:
            self.train_set, self.val_set = train_full, self._dataset(hp.val_root, train=False)
            return
        val_full = self._dataset(hp.root, train=False)
        gen = torch.Generator().manual_seed(hp.seed)
        train_idx, val_idx = [], []
        for label in range(len(self.class_names)):  # stratified: every class keeps val_split of its images
            idx = [i for i, y in enumerate(train_full.labels) if y == label]
            idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
            n_val = max(1, round(len(idx) * hp.val_split)) if len(idx) > 1 else 0
            val_idx += idx[:n_val]
            train_idx += idx[n_val:]
        self.train_set, self.val_set = Subset(train_full, sorted(train_idx)), Subset(val_full, sorted(val_idx))

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        hp = self.hparams
        sampler = RandomSampler(ds) if shuffle else evaluation_sampler(self, ds)  # each image once under DDP
        return DataLoader(ds, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          collate_fn=collate_classification)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


def collate_classification(batch):
    """Stack ``(image, label)`` pairs; samples skipped as unreadable (None) are dropped."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.int64)
    images, labels = zip(*batch, strict=True)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)
