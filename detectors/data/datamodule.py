"""``DetectionDataModule``: COCO, VOC or YOLO splits on disk -> batched dataloaders.

Batches are ``(images, targets)`` tuples of variable-size images, as torchvision
detectors expect. With ``generate=True`` the embedded shapes dataset is written to
``root`` on first use when it is missing or an empty folder, so the demo configs run on a fresh machine; any
other root is read as it is (``prepare_data``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from training.distributed import evaluation_sampler
from training.errors import BadFileError, BadValueError, MissingFileError
from training.images import DEFAULT_MAX_PIXELS, BadImageError

from .coco import CocoDetection, read_coco_categories
from .images import ImageFileDataset, bad_images_message
from .samples import BadSamplePolicy, DetectionDataset, collate_detection
from .shapes import MANIFEST_NAME, add_yolo_copy, generate_shapes
from .transforms import detection_transforms
from .voc import VOC_CLASSES, VOCDetection
from .yolo import DATA_YAML, YoloDetection, read_data_yaml

_LAYOUT_DEFAULTS = {
    "coco": ("images/{split}", "annotations/instances_{split}.json"),
    "voc": ("JPEGImages", "Annotations"),
    "yolo": (None, DATA_YAML),  # data.yaml names the image folders
}


class GroupedBatchSampler(BatchSampler):
    """Batches whose images share an aspect-ratio group (wide vs tall), as torchvision's references do.

    Padding a batch to its largest image wastes less when shapes agree. Takes a
    ``sampler`` argument so Lightning can swap in a ``DistributedSampler`` under DDP.
    """

    def __init__(self, sampler: Sampler, group_ids: list[int], batch_size: int, drop_last: bool = False):
        super().__init__(sampler, batch_size, drop_last)
        self.group_ids = group_ids

    def __iter__(self):
        buckets: dict[int, list[int]] = defaultdict(list)
        order: dict[int, int] = {}
        for position, idx in enumerate(self.sampler):
            order.setdefault(idx, position)
            bucket = buckets[self.group_ids[idx]]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()
        # Leftovers of all groups, merged in sampler order, so the number of batches depends only on the
        # number of samples -- under DDP every rank must run the same number of steps.
        leftovers = sorted((i for bucket in buckets.values() for i in bucket), key=order.__getitem__)
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else (n + self.batch_size - 1) // self.batch_size


class DetectionDataModule(L.LightningDataModule):
    """Detection data in COCO, Pascal VOC or YOLO (Ultralytics) layout.

    Args:
        root: dataset directory.
        format: "coco" (``images_dir``/``annotations`` templates with ``{split}``),
            "voc" (``JPEGImages``, ``Annotations``, ``ImageSets/Main/<split>.txt``) or
            "yolo" (``root/data.yaml`` naming ``images/<split>`` folders, ``labels/<split>/*.txt`` beside them).
        train_split, val_split, test_split: split names (``train2017``, ``val``, ...; for YOLO, keys of
            data.yaml: ``train``, ``val``, ``test``); without ``test_split``, ``test`` (saying so in the log)
            and ``predict`` use ``val_split``.
        images_dir, annotations: COCO path templates relative to ``root``; defaults fit the
            shapes layout (``images/{split}``, ``annotations/instances_{split}.json``). Real
            COCO 2017: ``images_dir="{split}"``. YOLO: ``annotations`` is the yaml's name in ``root``
            (default ``data.yaml``); ``images_dir`` does not apply.
        classes: VOC class names in label order (default: the 20 VOC classes). COCO and YOLO
            read their classes from the file (``categories``, data.yaml's ``names``); given for them, they must
            match it (or stand in for it when ``predict_images`` is used without annotations).
        pin_memory: page-locked host memory for faster GPU copies; None: when CUDA is available.
        aspect_ratio_grouping: batch wide and tall images separately.
        hflip_prob, photometric, scale_jitter: train augmentation (see ``detection_transforms``).
        strict: box anomalies (outside the image, zero size) are errors instead of repaired.
        on_bad_sample: "raise" stops at an unreadable image naming it; "skip" warns and drops it. ``predict``
            checks every file's header first: "raise" fails before any work, naming the files; a file that
            fails only when decoded is reported after the others' predictions are written.
        generate: write the embedded shapes dataset to ``root`` if it is missing or an empty folder (a root
            holding other files is read as the user's data, untouched; ``prepare_data``).
        predict_images: a directory, glob pattern or file of images to predict on instead of a split
            (``detectors.data.images.ImageFileDataset``; image ids are positions in the sorted file list).
    """

    def __init__(
        self,
        root: str = "data/shapes",
        format: Literal["coco", "voc", "yolo"] = "coco",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        images_dir: str | None = None,
        annotations: str | None = None,
        classes: list[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        aspect_ratio_grouping: bool = False,
        hflip_prob: float = 0.5,
        photometric: bool = True,
        scale_jitter: tuple[float, float] | None = None,
        strict: bool = False,
        on_bad_sample: BadSamplePolicy = "raise",
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        generate: bool = False,
        seed: int = 0,
        predict_images: str | None = None,
    ):
        super().__init__()
        if format not in _LAYOUT_DEFAULTS:
            raise BadValueError(f"format must be 'coco', 'voc' or 'yolo', got {format!r}")
        if format == "yolo" and images_dir is not None:
            raise BadValueError("data.init_args.images_dir does not apply to format yolo: data.yaml names the "
                                "image folders of its splits")  # fmt: skip
        self.save_hyperparameters()
        default_images, default_annotations = _LAYOUT_DEFAULTS[format]
        self.images_dir = images_dir or default_images
        self.annotations = annotations or default_annotations
        self._class_names: list[str] | None = None
        self._said_own_data = False
        self.datasets: dict[str, DetectionDataset] = {}

    # -- what the model needs to know before setup (LightningCLI links these) --
    @property
    def class_names(self) -> list[str]:
        """Class names in label order (label i+1 -> class_names[i]), read without loading a split."""
        if self._class_names is None:
            hp = self.hparams
            if hp.classes is not None:
                self._class_names = list(hp.classes)
            elif hp.format == "voc":
                self._class_names = list(VOC_CLASSES)
            elif hp.format == "yolo":
                self.prepare_data()
                self._class_names = read_data_yaml(self._yolo_yaml()).names
            else:
                self.prepare_data()
                categories = read_coco_categories(self._coco_annotations(hp.val_split))
                self._class_names = [c["name"] for c in categories]
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Including background, as torchvision counts."""
        return len(self.class_names) + 1

    def _yolo_yaml(self) -> str:
        """The YOLO dataset's yaml; a shapes dataset written without the YOLO copy is told how to get it."""
        path = os.path.join(self.hparams.root, self.annotations)
        if not os.path.exists(path) and os.path.isfile(os.path.join(self.hparams.root, MANIFEST_NAME)):
            raise MissingFileError(f"{path}: file not found; this shapes dataset has no YOLO copy: data.init_args."
                                   "generate true adds it (its other files stay as they are)")  # fmt: skip
        return path

    def _annotation_path(self, split: str) -> str:
        return os.path.join(self.hparams.root, self.annotations.format(split=split))

    def _coco_annotations(self, split: str) -> str:
        """The split's COCO annotation file, or an error saying which layout the root is read with."""
        path = self._annotation_path(split)
        if not os.path.isfile(path):
            raise MissingFileError(
                f"{path}: no such COCO annotation file; data root {self.hparams.root} is read as annotations "
                f"{self.annotations!r}, images {self.images_dir!r} with split {split!r}: set data.init_args."
                "annotations, images_dir and train_split/val_split to your data's layout (docs/data.md)"
            )
        return path

    def prepare_data(self) -> None:
        """With ``generate``, write the shapes dataset into ``root`` when it is missing or an empty folder.
        A root holding a shapes dataset (its manifest) is used as it is (with format yolo, its YOLO copy is
        added if it has none), and a root holding anything else is the user's own data, read as it is: nothing
        there is written, replaced or removed."""
        hp = self.hparams
        if hp.generate and hp.format == "yolo" and os.path.exists(os.path.join(hp.root, MANIFEST_NAME)) \
                and not os.path.exists(os.path.join(hp.root, self.annotations)):  # fmt: skip
            rank_zero_info(f"adding a YOLO copy to the shapes dataset in {hp.root} (data generate: true)")
            add_yolo_copy(hp.root)
        if not hp.generate or os.path.exists(os.path.join(hp.root, MANIFEST_NAME)):
            return
        root = os.path.abspath(hp.root)
        if os.path.exists(root) and not os.path.isdir(root):
            raise BadFileError(f"{root}: the data root (data.init_args.root) is a file, not a folder")
        if os.path.isdir(root) and any(os.scandir(root)):
            if not self._said_own_data:
                self._said_own_data = True
                rank_zero_info(f"data root {root} holds files and no shapes dataset: reading it as your data "
                               "(generate: true writes only into a missing or empty folder)")  # fmt: skip
            return
        # Said out loud: a mistyped root of one's own data would otherwise train on shapes without a word.
        rank_zero_info(f"generating the embedded shapes dataset in {root} (data generate: true; not your "
                       "data? check data.init_args.root, or set generate: false)")  # fmt: skip
        generate_shapes(hp.root, seed=hp.seed)

    def make_dataset(self, split: str, train: bool) -> DetectionDataset:
        hp = self.hparams
        transforms = detection_transforms(train, hp.hflip_prob, hp.photometric, hp.scale_jitter)
        common = dict(transforms=transforms, strict=hp.strict, on_bad_sample=hp.on_bad_sample,
                      max_image_pixels=hp.max_image_pixels)  # fmt: skip
        if hp.format == "voc":
            return VOCDetection(hp.root, split, classes=self.class_names, **common)
        if hp.format == "yolo":
            ds = YoloDetection(hp.root, split, self.annotations, **common)
            if ds.class_names != self.class_names:
                raise BadValueError(f"{ds.layout.file}: names {ds.class_names} differ from data.init_args."
                                    f"classes {self.class_names}")  # fmt: skip
            return ds
        images = os.path.join(hp.root, self.images_dir.format(split=split))
        ds = CocoDetection(images, self._coco_annotations(split), **common)
        if ds.class_names != self.class_names:
            raise BadValueError(
                f"{ds.annotation_file}: categories {ds.class_names} differ from the "
                f"{hp.val_split} split's {self.class_names}; all splits must declare the same categories"
            )
        return ds

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        wanted = {
            "fit": [("train", hp.train_split, True), ("val", hp.val_split, False)],
            "validate": [("val", hp.val_split, False)],
            "test": [("test", hp.test_split or hp.val_split, False)],
            "predict": [("predict", hp.test_split or hp.val_split, False)],
        }
        if stage == "test" and hp.test_split is None and "test" not in self.datasets:
            rank_zero_info(f"no data test_split set: testing on the {hp.val_split!r} split (test_* metrics "
                           "are validation-split numbers)")  # fmt: skip
        for key, split, train in wanted.get(stage, []) if stage else sum(wanted.values(), []):
            if key not in self.datasets:
                is_files = key == "predict" and hp.predict_images
                self.datasets[key] = self.make_image_files() if is_files else self.make_dataset(split, train)
                if key == "predict":
                    self._check_predict_images(self.datasets[key])

    def _check_predict_images(self, ds) -> None:
        """Before any image is predicted, with ``on_bad_sample: raise``: fail naming every file whose header
        is bad (``skip`` goes on without them). A file that passes and fails only when decoded is skipped and
        reported by the prediction writer after the other images' results are written, since raising there
        would throw them away: ``defer_bad_samples``."""
        if self.hparams.on_bad_sample == "raise" and (bad := ds.header_errors()):
            message = bad_images_message(list(bad.values()), len(ds))
            raise BadImageError(f"{message}; nothing was predicted: fix or remove them, or set "
                                "data.init_args.on_bad_sample skip to predict on the others")  # fmt: skip
        ds.defer_bad_samples = True

    def make_image_files(self):
        """The ``predict_images`` files; a COCO dataset's category ids are kept when its file exists."""
        hp = self.hparams
        label_to_cat_id = None
        annotations = self._annotation_path(hp.val_split)
        if hp.format == "coco" and os.path.isfile(annotations):
            categories = read_coco_categories(annotations)
            if [c["name"] for c in categories] != self.class_names:
                raise BadValueError(f"{annotations}: categories differ from classes={self.class_names}")
            label_to_cat_id = {label: c["id"] for label, c in enumerate(categories, start=1)}
        return ImageFileDataset(hp.predict_images, self.class_names, label_to_cat_id, hp.on_bad_sample,
                                hp.max_image_pixels)  # fmt: skip

    def _loader(self, key: str, train: bool) -> DataLoader:
        hp = self.hparams
        ds = self.datasets[key]
        workers = dict(
            num_workers=hp.num_workers,
            pin_memory=torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory,
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            collate_fn=collate_detection,
        )
        if train and hp.aspect_ratio_grouping:
            groups = [int(r >= 1.0) for r in ds.aspect_ratios()]
            sampler = GroupedBatchSampler(RandomSampler(ds), groups, hp.batch_size)
            return DataLoader(ds, batch_sampler=sampler, **workers)
        sampler = RandomSampler(ds) if train else evaluation_sampler(self, ds)  # each image once under DDP
        return DataLoader(ds, batch_size=hp.batch_size, sampler=sampler, **workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", train=False)

