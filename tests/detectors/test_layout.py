"""detectors/layout.py: the pretrained layout (frozen stages and BatchNorm) compared with torchvision's own
builders, and the FrozenBatchNorm2d eps of legacy files and of checkpoint bodies."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet18_Weights
from torchvision.models.detection import (
    FasterRCNN_ResNet50_FPN_Weights,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from detectors.backbones import backbone_body, count_parameters
from detectors.models import build_detector
from tests.detectors.tiny_detectors import (
    TINY,
    save_as,
)

# Tiny convolutions: on a few shared cores, intra-op threads cost far more than they bring.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_legacy_coco_file_gets_torchvision_eps0(offline_hub):
    # torchvision loads the old fasterrcnn_resnet50_fpn COCO_V1 file with FrozenBatchNorm2d eps=0.
    enum = FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    file = offline_hub / os.path.basename(enum.url)
    torch.manual_seed(0)
    save_as(torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None), file)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights="COCO_V1")
    tv_eps = {n: m.eps for n, m in tv.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert tv_eps and set(tv_eps.values()) == {0.0}
    for kwargs in ({"weights": "DEFAULT"}, {"weights_path": str(file)}):
        model = build_detector("fasterrcnn", "resnet50_fpn", 91, **kwargs)
        assert {n: m.eps for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)} == tv_eps
        assert {n: p.requires_grad for n, p in model.named_parameters()} == \
            {n: p.requires_grad for n, p in tv.named_parameters()}
    renamed = offline_hub.parent / "my_frcnn.pth"  # any other file: the default eps, as for any new weights
    os.replace(file, renamed)
    model = build_detector("fasterrcnn", "resnet50_fpn", 91, weights_path=str(renamed))
    assert {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)} == {1e-5}


@pytest.mark.parametrize("k", [0, 2, 5])
def test_trainable_layers_resnet_like_torchvision(offline_hub, k):
    resnet = torchvision.models.resnet18()
    file = offline_hub / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    if not file.exists():
        save_as(resnet, file)
    model = build_detector("fasterrcnn", "resnet18_fpn", 3, weights_backbone="DEFAULT",
                           trainable_backbone_layers=k, **TINY)
    tv = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=ResNet18_Weights.IMAGENET1K_V1, trainable_layers=k)
    ours, theirs = backbone_body(model), tv.body
    assert [(n, type(m)) for n, m in ours.named_modules()] == [(n, type(m)) for n, m in theirs.named_modules()]
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == \
        {n: p.requires_grad for n, p in theirs.named_parameters()}
    assert all(torch.equal(v, theirs.state_dict()[key]) for key, v in ours.state_dict().items())
    # Hand-worked: the top k of layer4, layer3, layer2, layer1, conv1 train.
    stages = {n.split(".")[0] for n, p in ours.named_parameters() if p.requires_grad}
    assert stages == set(["layer4", "layer3", "layer2", "layer1", "conv1"][:k])
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())


@pytest.mark.parametrize("k", [0, 3, 6])
def test_trainable_layers_mobilenet_like_torchvision(offline_hub, k):
    file = offline_hub / os.path.basename(MobileNet_V3_Large_Weights.IMAGENET1K_V1.url)
    if not file.exists():
        save_as(torchvision.models.mobilenet_v3_large(), file)
    model = build_detector("fasterrcnn", "mobilenet_v3_large_320_fpn", 3, weights_backbone="IMAGENET1K_V1",
                           trainable_backbone_layers=k)
    tv = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights_backbone="IMAGENET1K_V1", trainable_backbone_layers=k, num_classes=3)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in tv.named_modules()]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in tv.named_parameters()}
    body_state = tv.backbone.body.state_dict()
    assert all(torch.equal(v, body_state[key]) for key, v in backbone_body(model).state_dict().items())


def test_trainable_layers_without_weights_train_everything_like_torchvision():
    with pytest.warns(UserWarning, match="no effect"):
        model = build_detector("retinanet", "resnet18_fpn", 3, trainable_backbone_layers=1, **TINY)
    total, trainable = count_parameters(model)
    assert total == trainable
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone_body(model).modules())
