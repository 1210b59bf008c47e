"""Data sets and modules of the multi-process tests (tests/training/test_distributed.py) and of the scripts
here that run them, 2 CPU processes over gloo.

Each data set starves or poisons the process of rank 1 only: its samples there are all unreadable (None, as
``on_bad_sample="skip"`` gives) or NaN, so that process runs steps the other one does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from classifiers.data import collate_classification
from classifiers.module import FrozenBackboneClassifier
from detectors.data.samples import collate_detection
from detectors.module import FasterRCNNModule, RetinaNetModule

LR = 0.5
# RetinaNet: its loss samples no anchors or ROIs, so it does not depend on each process' RNG state
TINY_DETECTOR = dict(class_names=["a", "b", "c"], backbone="resnet18_fpn", min_size=64, max_size=64)


def on_rank_1() -> bool:
    """In the process of rank 1 of a 2-process run (the one these datasets starve or poison)."""
    return torch.distributed.is_initialized() and torch.distributed.get_rank() == 1


def trainer(devices: int = 2, **kwargs) -> L.Trainer:
    """A quiet CPU trainer; with several devices, DDP over gloo, this script launching the other processes."""
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


class HalfUnreadable(torch.utils.data.Dataset):
    """8 samples, all unreadable in the process of rank 1."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if on_rank_1():
            return None
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), i % 3


class HalfUnreadableDetection(torch.utils.data.Dataset):
    """4 images with 1-2 boxes each, all unreadable in the process of rank 1."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if on_rank_1():
            return None
        g = torch.Generator().manual_seed(i)
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])[: 1 + i % 2]
        target = {"boxes": boxes, "labels": torch.tensor([1 + i % 3, 2])[: len(boxes)], "image_id": i,
                  "iscrowd": torch.zeros(len(boxes), dtype=torch.int64)}  # fmt: skip
        return torch.rand(3, 64, 64, generator=g), target


class NaNOnRank1(torch.utils.data.Dataset):
    """2 images with a box each; NaN pixels in the process of rank 1."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        image = torch.full((3, 64, 64), float("nan")) if on_rank_1() else torch.rand(3, 64, 64)
        return image, {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1]), "image_id": i}


def tiny_detector() -> RetinaNetModule:
    torch.manual_seed(0)
    return RetinaNetModule(**TINY_DETECTOR, score_thresh=0.0)


def tiny_classifier() -> FrozenBackboneClassifier:
    torch.manual_seed(0)
    return FrozenBackboneClassifier(backbone="resnet18", num_classes=3, weights=None, freeze="all",
                                    optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0)  # fmt: skip


MODEL = {"classifier": tiny_classifier, "detector": tiny_detector}
DATA = {"classifier": HalfUnreadable, "detector": HalfUnreadableDetection}
COLLATE = {"classifier": collate_classification, "detector": collate_detection}


class RecordingDetector(RetinaNetModule):
    """The tiny detector, writing ``<rank>.txt`` with the error its training_step raised."""

    def __init__(self, out: Path):
        torch.manual_seed(0)
        super().__init__(**TINY_DETECTOR)
        self.out = out

    def training_step(self, batch, batch_idx: int):
        try:
            return super().training_step(batch, batch_idx)
        except (FloatingPointError, RuntimeError) as e:
            (self.out / f"{self.global_rank}.txt").write_text(str(e))
            raise


class _RecordsScored:
    """Writes OUT/<family>-<rank>.json: the image ids (detector) or the number of images (classifier) that
    this process scored in the validation epoch."""

    def on_validation_epoch_start(self) -> None:
        self.scored = []
        return super().on_validation_epoch_start()

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.scored += [int(t["image_id"]) for t in targets] if isinstance(targets, (list, tuple)) else [len(images)]
        return super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        (self.out / f"{self.family}-{self.global_rank}.json").write_text(json.dumps(self.scored))
        return super().on_validation_epoch_end()


class RecordingRetinaNet(_RecordsScored, RetinaNetModule):
    family = "detector"

    def __init__(self, out: Path):
        torch.manual_seed(0)
        super().__init__(**TINY_DETECTOR, score_thresh=0.0)
        self.out = out


class RecordingFasterRCNN(_RecordsScored, FasterRCNNModule):
    """Its val_loss samples anchors and ROIs: the same on any number of processes only if each image's sampling
    depends on that image alone."""

    family = "fasterrcnn"

    def __init__(self, out: Path):
        torch.manual_seed(0)
        super().__init__(**TINY_DETECTOR, score_thresh=0.0, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                         box_batch_size_per_image=16)  # fmt: skip
        self.out = out


class RecordingClassifier(_RecordsScored, FrozenBackboneClassifier):
    family = "classifier"

    def __init__(self, out: Path):
        torch.manual_seed(0)
        super().__init__(backbone="resnet18", num_classes=3, weights=None, freeze="all")
        self.out = out


def validate_on_datamodules(root: Path, out: Path, devices: int) -> dict[str, dict[str, float]]:
    """Validate both module families on their DataModules (Lightning's default use_distributed_sampler=True);
    returns each family's logged metrics."""
    from classifiers.data import ImageFolderDataModule
    from detectors.data.datamodule import DetectionDataModule

    runs = {"detector": (RecordingRetinaNet, DetectionDataModule(str(root), batch_size=2, num_workers=0)),
            "fasterrcnn": (RecordingFasterRCNN, DetectionDataModule(str(root), batch_size=2, num_workers=0)),
            "classifier": (RecordingClassifier, ImageFolderDataModule(
                str(root / "classification" / "train"), val_root=str(root / "classification" / "val"),
                augment=False, batch_size=2, num_workers=0))}  # fmt: skip
    metrics = {}
    for family, (cls, data) in runs.items():
        run = trainer(devices)
        run.validate(cls(out), datamodule=data)
        metrics[family] = {k: float(v) for k, v in run.callback_metrics.items()}
    return metrics
