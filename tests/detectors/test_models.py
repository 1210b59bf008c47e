"""detectors/models.py: build_detector's options reach torchvision, anchors and heads, and its errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from detectors.models import build_detector, num_classes_of
from tests.detectors.tiny_detectors import (
    FRCNN_LOSSES,
    TINY,
    assert_state_equal,
    save_as,
    tiny,
    two_images,
)

# Tiny convolutions: on a few shared cores, intra-op threads cost far more than they bring.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_faster_rcnn_options_reach_torchvision():
    model = build_detector("fasterrcnn", "resnet18_fpn", 3, min_size=48, max_size=96,
                           rpn_pre_nms_top_n_train=111, rpn_pre_nms_top_n_test=222, rpn_post_nms_top_n_train=33,
                           rpn_post_nms_top_n_test=44, rpn_score_thresh=0.2, box_batch_size_per_image=64,
                           score_thresh=0.3,
                           nms_thresh=0.4, detections_per_img=7, anchor_sizes=[16, 32, 64, 128, 256],
                           aspect_ratios=[1.0])
    assert model.transform.min_size == (48,) and model.transform.max_size == 96
    assert model.rpn._pre_nms_top_n == {"training": 111, "testing": 222}
    assert model.rpn._post_nms_top_n == {"training": 33, "testing": 44}
    assert model.rpn.score_thresh == 0.2
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh) == (0.3, 0.4)
    assert model.roi_heads.detections_per_img == 7
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.rpn.anchor_generator.aspect_ratios == ((1.0,),) * 5
    assert model.rpn.head.cls_logits.out_channels == 1 and model.rpn.head.bbox_pred.out_channels == 4
    images, targets = two_images(with_boxes=True)
    assert set(model.train()(images, targets)) == FRCNN_LOSSES


def test_retinanet_anchor_options(tmp_path):
    model = build_detector("retinanet", "resnet18_fpn", 3, **TINY, score_thresh=0.2, nms_thresh=0.6,
                           anchor_sizes=[16, 32, 64, 128, 256])
    # Octave scales 2^0, 2^(1/3), 2^(2/3), truncated to int as torchvision does: 16 -> 16, 20.16, 25.4.
    assert model.anchor_generator.sizes[0] == (16, 20, 25)
    assert model.anchor_generator.sizes[4] == (256, 322, 406)
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img) == (0.2, 0.6, 100)
    assert model.head.classification_head.cls_logits.out_channels == 9 * 3  # same anchor count: head kept

    nested = build_detector("retinanet", "resnet18_fpn", 3, **TINY, anchor_sizes=[[8, 16]] * 5,
                            aspect_ratios=[0.5, 1.0, 2.0])
    assert nested.anchor_generator.sizes == ((8, 16),) * 5
    head = nested.head
    assert head.classification_head.cls_logits.out_channels == 6 * 3 and head.classification_head.num_anchors == 6
    assert head.regression_head.bbox_reg.out_channels == 6 * 4
    images, targets = two_images(with_boxes=True)
    assert all(torch.isfinite(v) for v in nested.train()(images, targets).values())
    # A file of a model trained with such anchors reloads with the same anchor options, and only with them.
    save_as(nested, tmp_path / "nested.pth")
    again = build_detector("retinanet", "resnet18_fpn", 3, **TINY, anchor_sizes=[[8, 16]] * 5,
                           weights_path=str(tmp_path / "nested.pth"))
    assert assert_state_equal(again, nested.state_dict(), "<none>") > 100
    with pytest.raises(ValueError, match="nested.pth does not fit.*cls_logits.weight: file"):
        build_detector("retinanet", "resnet18_fpn", 3, **TINY, weights_path=str(tmp_path / "nested.pth"))


def test_mobilenet_faster_rcnn_flat_anchor_sizes_go_on_every_level():
    model = build_detector("fasterrcnn", "mobilenet_v3_large_320_fpn", 3, **TINY, anchor_sizes=[16, 32])
    assert model.rpn.anchor_generator.sizes == ((16, 32),) * 3
    assert model.rpn.head.cls_logits.out_channels == 2 * 3


def test_box_representation_size_sets_the_box_head_width():
    model = build_detector("fasterrcnn", "mobilenet_v3_large_fpn", 5, fpn_channels=16, box_representation_size=48,
                           **tiny("fasterrcnn"))
    assert model.roi_heads.box_head.fc6.in_features == 16 * 7 * 7
    assert model.roi_heads.box_head.fc7.out_features == 48
    assert model.roi_heads.box_predictor.cls_score.in_features == 48
    assert num_classes_of(model) == 5
    images, targets = two_images(with_boxes=True)
    assert set(model.train()(images, targets)) == FRCNN_LOSSES


@pytest.mark.parametrize("bad", [1, 0, True, 2.0])
def test_num_classes_counts_background(bad):
    with pytest.raises(ValueError, match="background"):
        build_detector("fasterrcnn", "resnet18_fpn", bad)


def test_option_errors():
    with pytest.raises(ValueError, match="rpn_pre_nms_top_n_test.*RetinaNet has no RPN"):
        build_detector("retinanet", "resnet18_fpn", 3, rpn_pre_nms_top_n_test=10)
    with pytest.raises(ValueError, match="group_norm_head"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, group_norm_head=True)
    with pytest.raises(ValueError, match="group_norm_head.*retinanet_resnet50_fpn_v2"):
        build_detector("retinanet", "resnet50_fpn", 3, group_norm_head=True)
    for arch, backbone in (("retinanet", "resnet50_fpn"), ("fasterrcnn", "resnet18_fpn")):
        with pytest.raises(ValueError, match="p6p7=False: a RetinaNet option of the composed backbones"):
            build_detector(arch, backbone, 3, p6p7=False)
    with pytest.raises(ValueError, match="3 feature maps"):  # P3-P5 without P6, P7: three levels of sizes
        build_detector("retinanet", "resnet18_fpn", 3, p6p7=False, anchor_sizes=[16, 32, 64, 128, 256])
    with pytest.raises(ValueError, match="5 feature maps"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, anchor_sizes=[32, 64])
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, rpn_anchor_generator=None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backbone="resnet50_fpn", fpn_channels=64), "torchvision's fixed composition"),
    (dict(backbone="resnet50_fpn_v2", returned_layers=[2, 3, 4]), "torchvision's fixed composition"),
    (dict(backbone="resnet18_fpn", returned_layers=[3, 2]), "increasing stage numbers"),
    (dict(backbone="resnet18_fpn", returned_layers=[0, 1]), "increasing stage numbers"),
    (dict(backbone="mobilenet_v3_large_fpn", returned_layers=[6]), "increasing stage numbers"),
    (dict(backbone="resnet18_fpn", fpn_channels=0), "positive int"),
])
def test_structure_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_detector("fasterrcnn", num_classes=3, **kwargs)
    with pytest.raises(ValueError, match="RetinaNet has no box head"):
        build_detector("retinanet", "resnet18_fpn", 3, box_representation_size=64)


def test_no_warnings_in_a_plain_build():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_detector("fasterrcnn", "resnet18_fpn", 3, **TINY)
