"""Detection data: COCO and VOC readers, the shapes generator, box-aware transforms, the DataModule."""

from .coco import CocoDetection
from .datamodule import DetectionDataModule
from .samples import DetectionDataset, ImageRecord, collate_detection
from .transforms import detection_transforms
from .voc import VOC_CLASSES, VOCDetection

__all__ = [
    "CocoDetection",
    "DetectionDataModule",
    "DetectionDataset",
    "ImageRecord",
    "VOCDetection",
    "VOC_CLASSES",
    "collate_detection",
    "detection_transforms",
]
