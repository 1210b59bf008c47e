"""detectors/pretrained.py: weights files (local, and the offline hub cache), a new head after loading, and
the errors that name the file."""

from __future__ import annotations

import math
import os
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    RetinaNet_ResNet50_FPN_V2_Weights,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from detectors.backbones import backbone_body
from detectors.models import BUILDERS, build_detector, num_classes_of
from tests.detectors.tiny_detectors import (
    TINY,
    assert_state_equal,
    save_as,
    two_images,
)

# Tiny convolutions: on a few shared cores, intra-op threads cost far more than they bring.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, kwargs, new_prefix", [
    ("fasterrcnn_resnet18_fpn", {}, "roi_heads.box_predictor."),
    ("retinanet_resnet18_fpn", {"group_norm_head": True}, "head.classification_head.cls_logits."),
])
def test_weights_path_then_new_head(tmp_path, name, kwargs, new_prefix):
    torch.manual_seed(0)
    coco = BUILDERS[name](num_classes=91, **TINY, **kwargs)
    file = tmp_path / "pretrained.pth"
    state = save_as(coco, file)
    model = BUILDERS[name](num_classes=4, weights_path=str(file), **TINY, **kwargs)

    assert num_classes_of(model) == 4
    compared = assert_state_equal(model, state, new_prefix)
    assert compared > 100  # backbone, FPN, RPN / box head, regression head, cls tower
    if name.startswith("fasterrcnn"):
        assert model.roi_heads.box_predictor.cls_score.weight.shape == (4, 1024)
        assert model.roi_heads.box_predictor.bbox_pred.weight.shape == (16, 1024)
    else:
        cls = model.head.classification_head
        assert cls.cls_logits.weight.shape == (9 * 4, 256, 3, 3) and cls.num_classes == 4
        assert any(isinstance(m, nn.GroupNorm) for m in cls.conv.modules())  # GroupNorm tower kept
        # torchvision's focal-loss prior init of the new layer: bias = -log((1 - 0.01) / 0.01)
        assert torch.allclose(cls.cls_logits.bias, torch.full((36,), -math.log(99)))
    # Loaded = pretrained: frozen BatchNorm in the body, conv1 + layer1 frozen (default 3 trainable stages).
    body = backbone_body(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    trainable_stages = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable_stages == {"layer2", "layer3", "layer4"}
    if name.startswith("retinanet"):  # the GroupNorm head trains
        images, targets = two_images(with_boxes=True)
        assert all(torch.isfinite(v) for v in model.train()(images, targets).values())


def test_weights_path_accepts_lightning_checkpoint_and_same_classes(tmp_path):
    torch.manual_seed(0)
    trained = BUILDERS["fasterrcnn_resnet18_fpn"](num_classes=5, **TINY)
    ckpt = {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = build_detector("fasterrcnn", "resnet18_fpn", 5, weights_path=str(tmp_path / "last.ckpt"), **TINY)
    assert assert_state_equal(model, trained.state_dict(), skip_prefix="<none>") > 100


def test_coco_weights_from_offline_hub_cache_match_torchvision(offline_hub):
    enum = FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1
    torch.manual_seed(0)
    reference = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None,
                                                                                  weights_backbone=None)
    state = save_as(reference, offline_hub / os.path.basename(enum.url))

    model = build_detector("fasterrcnn", "mobilenet_v3_large_320_fpn", 4, weights="DEFAULT")
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert assert_state_equal(model, state, "roi_heads.box_predictor.") > 100
    # torchvision's own builder on the same cached file: identical structure, freezing and values (but for
    # the new 4-class predictor), and the 320 variant's own defaults survive.
    tv = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights="DEFAULT")
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in tv.named_modules()]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in tv.named_parameters()}
    tv_state = tv.state_dict()
    assert model.state_dict().keys() == tv_state.keys()
    assert assert_state_equal(model, tv_state, "roi_heads.box_predictor.") > 100
    assert (model.transform.min_size, model.transform.max_size) == ((320,), 640)
    assert model.rpn._pre_nms_top_n["testing"] == 150 and model.rpn.score_thresh == 0.05

    # Other anchor counts per location: the RPN's output convs are new, its conv tower stays pretrained.
    with pytest.warns(UserWarning, match="2 anchors per location instead of 15"):
        anchored = build_detector("fasterrcnn", "mobilenet_v3_large_320_fpn", 91, weights="DEFAULT",
                                  anchor_sizes=[64], aspect_ratios=[0.5, 2.0])
    assert anchored.rpn.head.cls_logits.out_channels == 2
    assert assert_state_equal(anchored, state, ("rpn.head.cls_logits.", "rpn.head.bbox_pred.")) > 100


def test_retinanet_v2_coco_weights_from_cache_keep_group_norm(offline_hub):
    enum = RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1
    torch.manual_seed(0)
    reference = torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None)
    state = save_as(reference, offline_hub / os.path.basename(enum.url))
    model = build_detector("retinanet", "resnet50_fpn_v2", 4, weights="DEFAULT", **TINY)
    assert assert_state_equal(model, state, "head.classification_head.cls_logits.") > 100
    cls = model.head.classification_head
    assert cls.cls_logits.out_channels == 9 * 4
    assert sum(isinstance(m, nn.GroupNorm) for m in model.head.modules()) == 8
    assert model.head.regression_head._loss_type == "giou"
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())  # v2 keeps BatchNorm


def test_missing_cached_weights_say_where_to_put_the_file(offline_hub):
    enum = FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1
    expected = offline_hub / os.path.basename(enum.url)
    with pytest.raises(FileNotFoundError) as info:
        build_detector("fasterrcnn", "mobilenet_v3_large_320_fpn", 4, weights="DEFAULT", **TINY)
    assert str(expected) in str(info.value) and "weights_path" in str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)

    backbone_file = offline_hub / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    with pytest.raises(FileNotFoundError, match=str(backbone_file)):
        build_detector("retinanet", "resnet18_fpn", 4, weights_backbone="IMAGENET1K_V1", **TINY)


def test_weights_path_errors(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, weights_path=str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pth.*not a readable"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, weights_path=str(corrupt))
    other = tmp_path / "retinanet.pth"
    save_as(built("retinanet_resnet18_fpn"), other)
    with pytest.raises(ValueError, match="retinanet.pth: not a fasterrcnn state dict"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, weights_path=str(other))
    # Right arch, wrong backbone: the file and the first offending keys are named.
    with pytest.raises(ValueError, match=r"retinanet.pth does not fit.*(layer|body)") as info:
        build_detector("retinanet", "mobilenet_v3_large_fpn", 3, weights_path=str(other), **TINY)
    assert "shape mismatches" in str(info.value)


def test_weights_argument_errors():
    with pytest.raises(ValueError, match="alone"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, weights_path="x.pth", weights_backbone="DEFAULT")
    with pytest.raises(ValueError, match="no COCO weights for retinanet_resnet18_fpn"):
        build_detector("retinanet", "resnet18_fpn", 3, weights="DEFAULT")
    with pytest.raises(ValueError, match="COCO_V9.*COCO_V1, DEFAULT"):
        build_detector("fasterrcnn", "resnet50_fpn", 3, weights="COCO_V9")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, weights_backbone="COCO_V1")
