"""detectors/backbones.py: feature pyramids, stage freezing, body key names, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from detectors.backbones import backbone_body, count_parameters, freeze_backbone_layers
from detectors.models import build_detector
from tests.detectors.tiny_detectors import (
    FRCNN_LOSSES,
    RETINANET_LOSSES,
    tiny,
    two_images,
)

# Tiny convolutions: on a few shared cores, intra-op threads cost far more than they bring.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, strides", [
    ("fasterrcnn_resnet18_fpn", [4, 8, 16, 32, 64]),  # P2-P5 + max-pool level
    ("retinanet_resnet18_fpn", [8, 16, 32, 64, 128]),  # P3-P7
    ("retinanet_mobilenet_v3_large_fpn", [8, 16, 32, 64, 128]),
])
def test_feature_pyramid_strides(built, name, strides):
    model = built(name).eval()
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 256, 256))
    assert [256 // f.shape[-1] for f in features.values()] == strides
    assert all(f.shape[1] == 256 for f in features.values())


@pytest.mark.parametrize("arch, backbone, layers, strides, options", [
    ("fasterrcnn", "mobilenet_v3_large_fpn", [2, 3, 5], [8, 16, 32, 64], {}),  # + max-pool level
    ("fasterrcnn", "resnet18_fpn", [2, 3, 4], [8, 16, 32, 64], {}),
    ("retinanet", "mobilenet_v3_large_fpn", [3, 5], [16, 32, 64, 128], {}),  # + P6, P7
    ("retinanet", "resnet18_fpn", [1, 2, 3, 4], [4, 8, 16, 32, 64, 128], {}),
    ("retinanet", "mobilenet_v3_large_fpn", [2, 3, 5], [8, 16, 32], {"p6p7": False}),  # the body's maps only
])
def test_returned_layers_and_fpn_channels(arch, backbone, layers, strides, options):
    model = build_detector(arch, backbone, 3, returned_layers=layers, fpn_channels=32, **options,
                           **tiny(arch)).eval()  # fmt: skip
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 256, 256))
    assert [256 // f.shape[-1] for f in features.values()] == strides
    assert all(f.shape[1] == 32 for f in features.values())
    generator = model.rpn.anchor_generator if arch == "fasterrcnn" else model.anchor_generator
    assert len(generator.sizes) == len(strides)  # default anchors follow the number of maps
    images, targets = two_images(with_boxes=True)
    losses = model.train()(images, targets)
    assert set(losses) == (FRCNN_LOSSES if arch == "fasterrcnn" else RETINANET_LOSSES)
    assert all(torch.isfinite(v) for v in losses.values())


def test_count_parameters_hand_worked():
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # 3*2+2 = 8 and 2*1+1 = 3
    net[0].weight.requires_grad_(False)
    assert count_parameters(net) == (11, 5)


def test_backbone_body_loads_into_torchvision_classifiers(built):
    resnet = torchvision.models.resnet18()
    result = resnet.load_state_dict(backbone_body(built("retinanet_resnet18_fpn")).state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    features = torchvision.models.mobilenet_v3_large().features
    features.load_state_dict(backbone_body(built("retinanet_mobilenet_v3_large_fpn")).state_dict())


def test_freeze_backbone_layers_on_a_plain_resnet():
    resnet = torchvision.models.resnet18()
    freeze_backbone_layers(resnet, 2)
    assert {n.split(".")[0] for n, p in resnet.named_parameters() if p.requires_grad} == {"layer3", "layer4"}
    freeze_backbone_layers(resnet, 5)  # and back: bn1 joins conv1 at 5, fc is never a stage
    assert {n.split(".")[0] for n, p in resnet.named_parameters() if not p.requires_grad} == {"fc"}
    for bad in (-1, 6):
        with pytest.raises(ValueError, match=r"\[0, 5\]"):
            freeze_backbone_layers(resnet, bad)
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        freeze_backbone_layers(torchvision.models.mobilenet_v3_large().features, 7)
