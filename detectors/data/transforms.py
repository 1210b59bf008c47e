"""Box-aware augmentation with ``torchvision.transforms.v2``.

Images arrive as uint8 ``tv_tensors.Image`` (augmenting uint8 is cheaper) and leave
as float32 in [0, 1]. Every pipeline ends by clamping boxes to the image and
removing degenerate ones -- together with their labels, areas, crowd and
difficult flags -- so nothing malformed reaches a model.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from training.errors import BadValueError

# Per-box fields that must be filtered together with the boxes.
PER_BOX_FIELDS = ("labels", "area", "iscrowd", "difficult")


def _per_box_fields(inputs):
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    return tuple(target[k] for k in PER_BOX_FIELDS if isinstance(target, dict) and k in target)


def sanitize() -> v2.Compose:
    return v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(labels_getter=_per_box_fields)])


def detection_transforms(
    train: bool,
    hflip_prob: float = 0.5,
    photometric: bool = True,
    scale_jitter: tuple[float, float] | None = None,
) -> v2.Compose:
    """Train: horizontal flip, photometric jitter, optional scale jitter, then box sanitising. Val/test: none.

    ``scale_jitter=(lo, hi)`` zooms the image content by a random factor in
    ``[lo, hi]`` keeping the canvas size (``RandomAffine(scale=...)``), so the
    detector sees objects at more sizes than the dataset has.
    """
    steps: list = []
    if train:
        if photometric:
            steps.append(v2.RandomPhotometricDistort(p=0.5))
        if scale_jitter is not None:
            lo, hi = scale_jitter
            if not 0 < lo <= hi:
                raise BadValueError(
                    f"scale_jitter must be (lo, hi) with 0 < lo <= hi, got {scale_jitter}"
                )
            steps.append(v2.RandomAffine(degrees=0.0, scale=(lo, hi)))
        if hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
        steps.append(sanitize())
    # Evaluation keeps every ground-truth box the reader kept: a sub-pixel box is still an object (a miss)
    # or a crowd region to pycocotools, and dropping it would change the mAP.
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)
