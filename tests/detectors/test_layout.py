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
from detectors.module import RetinaNetModule
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


CLASSES = ["rectangle", "ellipse", "triangle"]


def tiny_module(cls, **kw):
    torch.manual_seed(0)
    return cls(**{"class_names": CLASSES, "min_size": 64, "max_size": 64, "warmup_iters": 2, "backbone": "resnet18_fpn",
                  **kw})


def test_trainable_layers_freeze_a_checkpoint_body_with_its_own_eps(tmp_path):
    # torchvision applies trainable_backbone_layers to its own weights only (and warns "no effect" otherwise);
    # a body from a litvision checkpoint is just as pretrained and gets the same layout.
    from classifiers.module import FrozenBackboneClassifier
    from training.saving import load_model, save_model

    torch.manual_seed(5)
    clf = FrozenBackboneClassifier("mobilenet_v3_large", class_names=CLASSES, weights=None, freeze="none")
    with torch.no_grad():  # small variances, where 1e-3 and FrozenBatchNorm2d's default 1e-5 differ (first
        # block only: 17 blocks of them would overflow float32)
        clf.backbone[0][1].running_var.uniform_(1e-4, 1e-2)
    pretrain = tmp_path / "pretrain.ckpt"
    save_model(clf, pretrain)
    options = dict(backbone="mobilenet_v3_large_fpn", backbone_checkpoint=str(pretrain), trainable_backbone_layers=3)
    det = tiny_module(RetinaNetModule, **options).eval()
    body = det.model.backbone.body
    # MobileNetV3-Large's stages start at features 0, 2, 4, 7, 13 and 16: the top three are features 7-16.
    assert {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad} == {str(i) for i in range(7, 17)}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert {m.eps for m in body.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.001}  # MobileNetV3's BatchNorm
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = list(body(x).values())[-1]
        torch.testing.assert_close(features, clf.backbone.eval()(x))  # what the classifier computed in eval mode

    # Frozen statistics take the checkpoint's eps whatever froze them: here a whole-detector weights_path.
    torch.save(det.model.state_dict(), tmp_path / "detector.pth")
    with_weights = tiny_module(RetinaNetModule, backbone="mobilenet_v3_large_fpn", weights_path=str(tmp_path / "detector.pth"),
                        backbone_checkpoint=str(pretrain))  # fmt: skip
    assert {m.eps for m in with_weights.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.001}

    # load_model rebuilds the layout and its eps without the pretraining checkpoint.
    save_model(det, tmp_path / "det.ckpt")
    pretrain.unlink()
    rebuilt = load_model(tmp_path / "det.ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(list(rebuilt.model.backbone.body(x).values())[-1], features, rtol=0, atol=0)

    # No checkpoint yet (a demo config before its pretraining step): the same layout, so that a run started now
    # and resumed from its config once the file exists rebuilds the model (and optimiser groups) it saved.
    with pytest.warns(UserWarning, match="stay frozen at their random initial weights"):
        early = tiny_module(RetinaNetModule, **options, if_checkpoint_missing="warn")
    trainable = [n for n, p in det.named_parameters() if p.requires_grad]
    assert [n for n, p in early.named_parameters() if p.requires_grad] == trainable
    assert early.state_dict().keys() == det.state_dict().keys()
