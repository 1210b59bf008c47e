"""Tests for detectors/models.py: variants, forward passes, weights (files and the offline hub cache), head
replacement, freezing compared with torchvision's own builders, and error messages.

Models are tiny (64 px images, no weights unless a test creates a local file) and cached per module.
Pretrained files are state dicts of freshly built models saved under the names torchvision expects, so the
real loading path runs without network; downloading is made to fail so nothing can hang on it.
"""

from __future__ import annotations

import math
import os
import urllib.error
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet18_Weights
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    RetinaNet,
    RetinaNet_ResNet50_FPN_V2_Weights,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from detectors.models import (
    BUILDERS,
    backbone_body,
    build_detector,
    count_parameters,
    freeze_backbone_layers,
    list_variants,
    num_classes_of,
)

TINY = dict(min_size=64, max_size=64)
FRCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
RETINANET_LOSSES = {"classification", "bbox_regression"}
SMALL = ["fasterrcnn_resnet18_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet18_fpn",
         "retinanet_mobilenet_v3_large_fpn"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convolutions: on a few shared cores, intra-op threads cost far more than they bring.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str) -> dict:
    """Small images; for Faster R-CNN also few proposals / sampled ROIs (its 12544x1024 box head dominates)."""
    few_rois = dict(rpn_post_nms_top_n_train=100, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)
    return TINY | few_rois if name.startswith("fasterrcnn") else TINY


@pytest.fixture(scope="module")
def built():
    """variant name -> a 3-class tiny model without weights, built once per module."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = BUILDERS[name](num_classes=3, **tiny(name))
        return cache[name]

    return get


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub dir under tmp_path ($TORCH_HOME); any download attempt raises URLError."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored afterwards; set_dir below changes it
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: refusing to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def _save_as(model_or_state, path):
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    torch.save(state, path)
    return state


def _batch(with_boxes: bool):
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0]]), torch.zeros(0, 4)] if with_boxes else [torch.zeros(0, 4)] * 2
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)] if with_boxes else \
        [torch.zeros(0, dtype=torch.int64)] * 2
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]


def _assert_state_equal(model: nn.Module, expected: dict, skip_prefix: str | tuple[str, ...]) -> int:
    compared = 0
    for key, value in model.state_dict().items():
        if key.startswith(skip_prefix):
            continue
        assert torch.equal(value, expected[key]), key
        compared += 1
    return compared


# ------------------------------------------------------------------------------------------------ variants


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
    images, targets = _batch(with_boxes=True)
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
    images, targets = _batch(with_boxes=False)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # Nothing to regress: box losses are exactly zero, classification still learns "background".
    box_keys = ["loss_box_reg", "loss_rpn_box_reg"] if name.startswith("fasterrcnn") else ["bbox_regression"]
    assert all(losses[k].item() == 0.0 for k in box_keys)


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


# ------------------------------------------------------------------------------------------------ options


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
    images, targets = _batch(with_boxes=True)
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
    images, targets = _batch(with_boxes=True)
    assert all(torch.isfinite(v) for v in nested.train()(images, targets).values())
    # A file of a model trained with such anchors reloads with the same anchor options, and only with them.
    _save_as(nested, tmp_path / "nested.pth")
    again = build_detector("retinanet", "resnet18_fpn", 3, **TINY, anchor_sizes=[[8, 16]] * 5,
                           weights_path=str(tmp_path / "nested.pth"))
    assert _assert_state_equal(again, nested.state_dict(), "<none>") > 100
    with pytest.raises(ValueError, match="nested.pth does not fit.*cls_logits.weight: file"):
        build_detector("retinanet", "resnet18_fpn", 3, **TINY, weights_path=str(tmp_path / "nested.pth"))


def test_mobilenet_faster_rcnn_flat_anchor_sizes_go_on_every_level():
    model = build_detector("fasterrcnn", "mobilenet_v3_large_320_fpn", 3, **TINY, anchor_sizes=[16, 32])
    assert model.rpn.anchor_generator.sizes == ((16, 32),) * 3
    assert model.rpn.head.cls_logits.out_channels == 2 * 3


# ------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("name, kwargs, new_prefix", [
    ("fasterrcnn_resnet18_fpn", {}, "roi_heads.box_predictor."),
    ("retinanet_resnet18_fpn", {"group_norm_head": True}, "head.classification_head.cls_logits."),
])
def test_weights_path_then_new_head(tmp_path, name, kwargs, new_prefix):
    torch.manual_seed(0)
    coco = BUILDERS[name](num_classes=91, **TINY, **kwargs)
    file = tmp_path / "pretrained.pth"
    state = _save_as(coco, file)
    model = BUILDERS[name](num_classes=4, weights_path=str(file), **TINY, **kwargs)

    assert num_classes_of(model) == 4
    compared = _assert_state_equal(model, state, new_prefix)
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
        images, targets = _batch(with_boxes=True)
        assert all(torch.isfinite(v) for v in model.train()(images, targets).values())


def test_weights_path_accepts_lightning_checkpoint_and_same_classes(tmp_path):
    torch.manual_seed(0)
    trained = BUILDERS["fasterrcnn_resnet18_fpn"](num_classes=5, **TINY)
    ckpt = {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = build_detector("fasterrcnn", "resnet18_fpn", 5, weights_path=str(tmp_path / "last.ckpt"), **TINY)
    assert _assert_state_equal(model, trained.state_dict(), skip_prefix="<none>") > 100


def test_coco_weights_from_offline_hub_cache_match_torchvision(offline_hub):
    enum = FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1
    torch.manual_seed(0)
    reference = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None,
                                                                                  weights_backbone=None)
    state = _save_as(reference, offline_hub / os.path.basename(enum.url))

    model = build_detector("fasterrcnn", "mobilenet_v3_large_320_fpn", 4, weights="DEFAULT")
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert _assert_state_equal(model, state, "roi_heads.box_predictor.") > 100
    # torchvision's own builder on the same cached file: identical structure, freezing and values (but for
    # the new 4-class predictor), and the 320 variant's own defaults survive.
    tv = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights="DEFAULT")
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in tv.named_modules()]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in tv.named_parameters()}
    tv_state = tv.state_dict()
    assert model.state_dict().keys() == tv_state.keys()
    assert _assert_state_equal(model, tv_state, "roi_heads.box_predictor.") > 100
    assert (model.transform.min_size, model.transform.max_size) == ((320,), 640)
    assert model.rpn._pre_nms_top_n["testing"] == 150 and model.rpn.score_thresh == 0.05

    # Other anchor counts per location: the RPN's output convs are new, its conv tower stays pretrained.
    with pytest.warns(UserWarning, match="2 anchors per location instead of 15"):
        anchored = build_detector("fasterrcnn", "mobilenet_v3_large_320_fpn", 91, weights="DEFAULT",
                                  anchor_sizes=[64], aspect_ratios=[0.5, 2.0])
    assert anchored.rpn.head.cls_logits.out_channels == 2
    assert _assert_state_equal(anchored, state, ("rpn.head.cls_logits.", "rpn.head.bbox_pred.")) > 100


def test_retinanet_v2_coco_weights_from_cache_keep_group_norm(offline_hub):
    enum = RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1
    torch.manual_seed(0)
    reference = torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None)
    state = _save_as(reference, offline_hub / os.path.basename(enum.url))
    model = build_detector("retinanet", "resnet50_fpn_v2", 4, weights="DEFAULT", **TINY)
    assert _assert_state_equal(model, state, "head.classification_head.cls_logits.") > 100
    cls = model.head.classification_head
    assert cls.cls_logits.out_channels == 9 * 4
    assert sum(isinstance(m, nn.GroupNorm) for m in model.head.modules()) == 8
    assert model.head.regression_head._loss_type == "giou"
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())  # v2 keeps BatchNorm


def test_legacy_coco_file_gets_torchvision_eps0(offline_hub):
    # torchvision loads the old fasterrcnn_resnet50_fpn COCO_V1 file with FrozenBatchNorm2d eps=0.
    enum = FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    file = offline_hub / os.path.basename(enum.url)
    torch.manual_seed(0)
    _save_as(torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None), file)
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


@pytest.mark.parametrize("k", [0, 2, 5])
def test_trainable_layers_resnet_like_torchvision(offline_hub, k):
    resnet = torchvision.models.resnet18()
    file = offline_hub / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    if not file.exists():
        _save_as(resnet, file)
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
        _save_as(torchvision.models.mobilenet_v3_large(), file)
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


# ------------------------------------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown detector variant 'retinanet_vgg16'") as info:
        build_detector("retinanet", "vgg16")
    assert "retinanet_resnet18_fpn" in str(info.value) and "fasterrcnn_resnet50_fpn_v2" in str(info.value)


@pytest.mark.parametrize("bad", [1, 0, True, 2.0])
def test_num_classes_counts_background(bad):
    with pytest.raises(ValueError, match="background"):
        build_detector("fasterrcnn", "resnet18_fpn", bad)


def test_weights_path_errors(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, weights_path=str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pth.*not a readable"):
        build_detector("fasterrcnn", "resnet18_fpn", 3, weights_path=str(corrupt))
    other = tmp_path / "retinanet.pth"
    _save_as(built("retinanet_resnet18_fpn"), other)
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


def test_no_warnings_in_a_plain_build():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_detector("fasterrcnn", "resnet18_fpn", 3, **TINY)


# ------------------------------------------------------------------------------- composed FPN structures


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
    images, targets = _batch(with_boxes=True)
    losses = model.train()(images, targets)
    assert set(losses) == (FRCNN_LOSSES if arch == "fasterrcnn" else RETINANET_LOSSES)
    assert all(torch.isfinite(v) for v in losses.values())


def test_box_representation_size_sets_the_box_head_width():
    model = build_detector("fasterrcnn", "mobilenet_v3_large_fpn", 5, fpn_channels=16, box_representation_size=48,
                           **tiny("fasterrcnn"))
    assert model.roi_heads.box_head.fc6.in_features == 16 * 7 * 7
    assert model.roi_heads.box_head.fc7.out_features == 48
    assert model.roi_heads.box_predictor.cls_score.in_features == 48
    assert num_classes_of(model) == 5
    images, targets = _batch(with_boxes=True)
    assert set(model.train()(images, targets)) == FRCNN_LOSSES


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
