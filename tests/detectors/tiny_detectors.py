"""Tiny torchvision detectors for the tests of detectors/{variants,backbones,pretrained,layout,models}.py.

Models are tiny: 64 px images, no weights unless a test creates a local file. The fixtures that build
them once per module and make the torch hub offline are in tests/detectors/conftest.py.
"""

from __future__ import annotations

import torch
from torch import nn

TINY = dict(min_size=64, max_size=64)
FRCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
RETINANET_LOSSES = {"classification", "bbox_regression"}
SMALL = ["fasterrcnn_resnet18_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet18_fpn",
         "retinanet_mobilenet_v3_large_fpn"]


def tiny(name: str) -> dict:
    """Small images; for Faster R-CNN also few proposals / sampled ROIs (its 12544x1024 box head dominates)."""
    few_rois = dict(rpn_post_nms_top_n_train=100, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)
    return TINY | few_rois if name.startswith("fasterrcnn") else TINY


def save_as(model_or_state, path):
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    torch.save(state, path)
    return state


def two_images(with_boxes: bool):
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0]]), torch.zeros(0, 4)] if with_boxes else [torch.zeros(0, 4)] * 2
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)] if with_boxes else \
        [torch.zeros(0, dtype=torch.int64)] * 2
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]


def assert_state_equal(model: nn.Module, expected: dict, skip_prefix: str | tuple[str, ...]) -> int:
    compared = 0
    for key, value in model.state_dict().items():
        if key.startswith(skip_prefix):
            continue
        assert torch.equal(value, expected[key]), key
        compared += 1
    return compared
