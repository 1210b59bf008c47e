"""Detection data: COCO, VOC and YOLO readers, the shapes generator, box-aware transforms, the DataModule.

- ``samples``: ``ImageRecord`` (one image's boxes, parsed), ``DetectionDataset`` (records -> samples),
  ``collate_detection``; the format readers ``coco``, ``voc`` and ``yolo`` build the records.
- ``transforms``: train/eval augmentation that keeps boxes, labels and flags together.
- ``datamodule``: ``DetectionDataModule``, COCO, VOC or YOLO splits on disk -> batched dataloaders.
- ``shapes`` (drawn by ``shapes_scene``, written by ``shapes_files``): the synthetic dataset and its command.
"""

from .coco import CocoDetection
from .datamodule import DetectionDataModule
from .samples import DetectionDataset, ImageRecord, collate_detection
from .transforms import detection_transforms
from .voc import VOC_CLASSES, VOCDetection
from .yolo import YoloDetection

__all__ = [
    "CocoDetection",
    "DetectionDataModule",
    "DetectionDataset",
    "ImageRecord",
    "collate_detection",
    "detection_transforms",
    "VOCDetection",
    "VOC_CLASSES",
    "YoloDetection",
]
