"""Detection data: COCO and VOC readers, the shapes generator, box-aware transforms, the DataModule.

Names are imported on first use so that ``python -m detectors.shapes`` does not pay for importing
torch and Lightning before it writes a single file.
"""

import importlib

_EXPORTS = {
    "CocoDetection": ".coco",
    "DetectionDataModule": ".datamodule",
    "DetectionDataset": ".samples",
    "ImageRecord": ".samples",
    "collate_detection": ".samples",
    "detection_transforms": ".transforms",
    "VOCDetection": ".voc",
    "VOC_CLASSES": ".voc",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
