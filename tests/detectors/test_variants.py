"""detectors/variants.py: every variant builds and runs, the composed ones are torchvision's own."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    RetinaNet,
)

from detectors.backbones import count_parameters
from detectors.models import BUILDERS, build_detector, num_classes_of
from detectors.variants import list_variants
from tests.detectors.tiny_detectors import (
    FRCNN_LOSSES,
    RETINANET_LOSSES,
    SMALL,
    two_images,
)

# Tiny convolutions: on a few shared cores, intra-op threads cost far more than they bring.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_variants_cover_the_issue():
    names = set(list_variants())
    required = {f"fasterrcnn_{b}" for b in ["resnet50_fpn", "resnet50_fpn_v2", "mobilenet_v3_large_fpn",
                                             "mobilenet_v3_large_320_fpn"]}
    required |= {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"}
    required |= {f"{a}_{b}" for a in ["fasterrcnn", "retinanet"]
                 for b in ["resnet18_fpn", "resnet34_fpn", "resnet50_fpn", "mobilenet_v3_large_fpn"]}
    assert required <= names
    assert set(BUILDERS) == names
    assert all(n.startswith("retinanet_") for n in list_variants("retinanet"))
    assert set(list_variants("fasterrcnn")) | set(list_variants("retinanet")) == names


@pytest.mark.parametrize("name", list_variants())
def test_every_variant_builds(built, name):
    model = built(name)
    assert isinstance(model, FasterRCNN if name.startswith("fasterrcnn") else RetinaNet)
    assert num_classes_of(model) == 3
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    # 100 detections for both types (COCO maxDets=100), though torchvision's RetinaNet defaults to 300.
    per_img = model.roi_heads.detections_per_img if isinstance(model, FasterRCNN) else model.detections_per_img
    assert per_img == 100
    total, trainable = count_parameters(model)
    assert total == trainable > 0  # no weights: torchvision trains every layer


@pytest.mark.parametrize("name", SMALL)
def test_forward_train_and_eval(built, name):
    model = built(name)
    torch.manual_seed(1)
    images, targets = two_images(with_boxes=True)
    model.train()
    losses = model(images, targets)
    assert set(losses) == (FRCNN_LOSSES if name.startswith("fasterrcnn") else RETINANET_LOSSES)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, img in zip(out, images, strict=True):
        assert set(det) == {"boxes", "labels", "scores"}
        d = det["boxes"].shape[0]
        assert det["boxes"].shape == (d, 4) and det["labels"].shape == det["scores"].shape == (d,)
        assert d <= 100 and det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 1) & (det["labels"] <= 2)).all()
        boxes = det["boxes"]  # XYXY inside the original image
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert (boxes[:, 2] <= img.shape[2]).all() and (boxes[:, 3] <= img.shape[1]).all()


@pytest.mark.parametrize("name", ["fasterrcnn_resnet18_fpn", "retinanet_resnet18_fpn"])
def test_images_without_objects_give_finite_losses(built, name):
    model = built(name).train()
    images, targets = two_images(with_boxes=False)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # Nothing to regress: box losses are exactly zero, classification still learns "background".
    box_keys = ["loss_box_reg", "loss_rpn_box_reg"] if name.startswith("fasterrcnn") else ["bbox_regression"]
    assert all(losses[k].item() == 0.0 for k in box_keys)


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown detector variant 'retinanet_vgg16'") as info:
        build_detector("retinanet", "vgg16")
    assert "retinanet_resnet18_fpn" in str(info.value) and "fasterrcnn_resnet50_fpn_v2" in str(info.value)


@pytest.mark.parametrize("name, torchvision_builder", [
    ("mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_fpn"),
    ("mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"),
])
def test_composed_mobilenet_faster_rcnn_is_torchvisions(name, torchvision_builder):
    """Our composition (so that the FPN can change) builds exactly torchvision's model by default: same
    modules in the same order (same init under one seed), same options."""
    torch.manual_seed(0)
    expected = getattr(torchvision.models.detection, torchvision_builder)(weights=None, weights_backbone=None,
                                                                         num_classes=4)
    torch.manual_seed(0)
    ours = build_detector("fasterrcnn", name, 4)
    a, b = expected.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ours.rpn.anchor_generator.sizes == expected.rpn.anchor_generator.sizes
    assert ours.rpn.score_thresh == expected.rpn.score_thresh == 0.05
    assert ours.rpn._pre_nms_top_n == expected.rpn._pre_nms_top_n
    assert ours.rpn._post_nms_top_n == expected.rpn._post_nms_top_n
    assert (ours.transform.min_size, ours.transform.max_size) == (expected.transform.min_size,
                                                                  expected.transform.max_size)
    bn = [(m.eps, m.momentum) for m in ours.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert set(bn) == {(1e-5, 0.1)}  # torchvision's detection BatchNorm, not the classifier's (1e-3, 0.01)
