"""Build a torchvision Faster R-CNN (two-stage) or RetinaNet (one-stage) detector: :func:`build_detector`.

The variants (``detectors.variants``) give the untrained structure; this module adds what is not structure:
pretrained weights (``detectors.pretrained``) and the layout they imply (``detectors.layout``), the
constructor options under torchvision's names, anchors, and a new classification layer for another class
count. Unlike torchvision's builders, nothing is pretrained unless asked for: torchvision defaults
``weights_backbone`` to ImageNet for some variants, which would need the network.

Inputs and outputs are torchvision's: a list of float images ``[3, H, W]`` in 0..1; targets with
``boxes`` FloatTensor[N, 4] XYXY absolute pixels and ``labels`` Int64Tensor[N] in 1..K (0 = background, so
``num_classes = K + 1``). Train mode returns a dict of scalar losses, eval mode a list of dicts with
``boxes`` FloatTensor[D, 4] (XYXY), ``labels`` Int64Tensor[D], ``scores`` FloatTensor[D].

Options of :func:`build_detector` (None or absent: the variant's default):

    min_size, max_size: image resize bounds of ``GeneralizedRCNNTransform``; None = the variant's
        torchvision default (800/1333; 320/640 for ``mobilenet_v3_large_320_fpn``).
    rpn_*_nms_top_n_*, box_batch_size_per_image: Faster R-CNN only (RPN proposals kept before/after NMS,
        ROIs sampled per image for the box head).
    rpn_score_thresh: Faster R-CNN only: proposals with a lower objectness are dropped, in training too
        (torchvision: 0.05 for the MobileNetV3 variants, else 0). From scratch, every objectness starts
        near 0, so 0.05 starves the box head of proposals for the first epochs.
    score_thresh, nms_thresh: detection score threshold and per-class NMS IoU (torchvision defaults 0.05
        and 0.5).
    detections_per_img: detections kept per image; 100 for both types (torchvision's RetinaNet uses 300)
        so both are scored under COCO's maxDets=100.
    group_norm_head: RetinaNet on a composed backbone (resnet18/34, mobilenet): GroupNorm(32) in the head
        towers as ``retinanet_resnet50_fpn_v2`` has.
    p6p7: RetinaNet: the paper's and torchvision's two extra levels, P6 and P7 computed from P5 (strides 64
        and 128). False (composed backbones only): the body's maps alone, e.g. for small images, where P6 and
        P7 are 3 x 3 and 2 x 2 maps (15% of a demo step for no accuracy).
    fpn_channels, returned_layers: width of the FPN (and so of the heads; torchvision: 256) and the body
        stages feeding it (``detectors.backbones.fpn_backbone``: ResNet 1..4, MobileNetV3 0..5). Variants
        composed here only (every one except the ``resnet50`` ones); the head and the default anchors follow
        the number of feature maps. Changes the structure, so COCO detector weights no longer fit (ImageNet
        ``weights_backbone`` still does).
    box_representation_size: width of Faster R-CNN's two-layer box head (torchvision: 1024); its first
        layer has ``fpn_channels * 7 * 7 * box_representation_size`` weights.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
from torchvision.models.detection.rpn import RPNHead

from training.errors import BadValueError

from .backbones import backbone_body, count_parameters, freeze_backbone_layers, use_channels_last
from .layout import apply_pretrained_layout, set_frozen_bn_eps
from .pretrained import cached_weights_path, load_state_dict_file, resolve_pretrained
from .variants import VARIANTS, Arch, Variant, find_variant, list_variants, octave_sizes

# build_detector's options that torchvision's constructors take, under their names there: (Faster R-CNN's,
# RetinaNet's); None: not an option of that detector type.
_TORCHVISION_NAMES: dict[str, tuple[str, str | None]] = {
    "min_size": ("min_size", "min_size"),
    "max_size": ("max_size", "max_size"),
    "rpn_pre_nms_top_n_train": ("rpn_pre_nms_top_n_train", None),
    "rpn_pre_nms_top_n_test": ("rpn_pre_nms_top_n_test", None),
    "rpn_post_nms_top_n_train": ("rpn_post_nms_top_n_train", None),
    "rpn_post_nms_top_n_test": ("rpn_post_nms_top_n_test", None),
    "rpn_score_thresh": ("rpn_score_thresh", None),
    "box_batch_size_per_image": ("box_batch_size_per_image", None),
    "score_thresh": ("box_score_thresh", "score_thresh"),
    "nms_thresh": ("box_nms_thresh", "nms_thresh"),
    "detections_per_img": ("box_detections_per_img", "detections_per_img"),
}
# Options of the structures composed in detectors.variants (their build functions' arguments).
_STRUCTURE_OPTIONS = ("fpn_channels", "returned_layers", "box_representation_size", "group_norm_head", "p6p7")
_DEFAULTS = {"detections_per_img": 100, "group_norm_head": False, "p6p7": True}
_RESERVED = ("anchor_generator", "rpn_anchor_generator", "head", "rpn_head", "box_predictor")


def build_detector(
    arch: Arch,
    backbone: str = "resnet50_fpn",
    num_classes: int = 91,
    *,
    weights: str | None = None,
    weights_backbone: str | None = None,
    weights_path: str | None = None,
    trainable_backbone_layers: int | None = None,
    anchor_sizes: list[list[int]] | list[int] | None = None,
    aspect_ratios: list[float] | None = None,
    pretrained_layout: bool = False,
    frozen_bn_eps: float | None = None,
    **options: Any,
) -> nn.Module:
    """Build a torchvision ``FasterRCNN`` or ``RetinaNet``; see :func:`list_variants` for ``arch``/``backbone``.

    Args:
        num_classes: classes including background (K object classes -> K + 1). With pretrained weights of
            another class count the model is built with the file's classes, loaded, then given a new
            classification layer (:func:`replace_head`).
        weights: COCO detector weights name of the variant's torchvision enum ("DEFAULT", "COCO_V1").
        weights_backbone: ImageNet weights name of the body's enum ("DEFAULT", "IMAGENET1K_V1"); ignored when
            ``weights`` is given, as in torchvision.
        weights_path: local full-detector state dict (``.pth``/``.pt``, or a Lightning checkpoint with the
            detector under ``model.``); its class count is read from the file. Excludes the two above. It
            is treated as pretrained (frozen BatchNorm, frozen stages). A file named like torchvision's
            legacy ``fasterrcnn_resnet50_fpn``/``retinanet_resnet50_fpn`` COCO_V1 file gets its eps=0 too
            (``detectors.layout``).
        trainable_backbone_layers: body stages left trainable, counted from the top: 0..5 for ResNet, 0..6
            for MobileNetV3; default 3. As in torchvision it only applies to pretrained models: without any
            weights every layer trains (torchvision warns if a value was given).
        anchor_sizes: per feature map, a list of sizes; or a flat list of one base size per level expanded as
            the variant's default is (Faster R-CNN ResNet: one size per level; Faster R-CNN MobileNet: all
            sizes on every level; RetinaNet: sizes x 2^0, 2^(1/3), 2^(2/3) per level). Changing the number of
            anchors per location re-initialises the head's output convolutions.
        aspect_ratios: height/width ratios used on every level (default 0.5, 1, 2).
        **options: torchvision's constructor options and the composed structures' (the module docstring,
            'Options'; None or absent: the variant's default), then any other argument of torchvision's
            ``FasterRCNN``/``RetinaNet`` constructor, passed on as it is.
        pretrained_layout: build the structure a pretrained model has (FrozenBatchNorm2d, frozen stages)
            without loading any weights -- what ``load_model`` needs to rebuild a saved model offline.
        frozen_bn_eps: eps of the FrozenBatchNorm2d layers (torchvision loads its legacy COCO_V1 files with
            0); None keeps the default or what the weights imply (``detectors.layout``).
    """
    variant = find_variant(arch, backbone)
    _check_num_classes(num_classes)
    kwargs = _constructor_options(variant, options)
    pretrained = resolve_pretrained(variant, weights, weights_backbone, weights_path)
    model = variant.structure(pretrained.num_classes(arch, num_classes), **kwargs)
    if pretrained.state is not None:  # a file of a model trained with custom anchors has their head shapes
        _set_anchors(model, variant, anchor_sizes, aspect_ratios, pretrained=False)
    apply_pretrained_layout(model, variant, pretrained.given or pretrained_layout, trainable_backbone_layers)
    pretrained.load_into(model)
    set_frozen_bn_eps(model, variant, pretrained, frozen_bn_eps)
    if pretrained.state is None:
        _set_anchors(model, variant, anchor_sizes, aspect_ratios, pretrained=pretrained.detector is not None)
    if num_classes_of(model) != num_classes:
        replace_head(model, num_classes)
    return model


DETECTOR_ARGUMENTS = frozenset(
    [name for name in inspect.signature(build_detector).parameters if name not in ("arch", "num_classes", "options")]
    + [*_TORCHVISION_NAMES, *_STRUCTURE_OPTIONS]
)
"""The names :func:`build_detector` takes besides ``arch`` and ``num_classes`` (and torchvision's own)."""


def _constructor_options(variant: Variant, options: dict[str, Any]) -> dict[str, Any]:
    """The variant structure's keyword arguments for build_detector's ``options`` (torchvision's names, the
    unset ones left out); refuses an option the variant does not have."""
    opts = {**_DEFAULTS, **options}
    fasterrcnn, custom_retinanet = variant.arch == "fasterrcnn", variant.arch == "retinanet" and variant.custom
    given = {k: v for k, v in opts.items() if v is not None and (k in _TORCHVISION_NAMES or k in _STRUCTURE_OPTIONS)}
    for reserved in _RESERVED:
        if reserved in opts:
            raise BadValueError(f"{reserved} is built here: use anchor_sizes/aspect_ratios/num_classes instead")
    rpn = [k for k in _TORCHVISION_NAMES if _TORCHVISION_NAMES[k][1] is None and k in given]
    if fasterrcnn and opts["group_norm_head"]:
        raise BadValueError("group_norm_head is a RetinaNet option (Faster R-CNN v2 already has BatchNorm heads)")
    if not fasterrcnn and rpn:
        raise BadValueError(f"{', '.join(rpn)}: Faster R-CNN options, RetinaNet has no RPN or ROI sampling")
    _check_structure(variant, given)
    if not opts["p6p7"] and not custom_retinanet:  # where it is passed on below
        raise BadValueError(f"p6p7=False: a RetinaNet option of the composed backbones; {variant.name} has fixed "
                            "levels")
    if opts["group_norm_head"] and not custom_retinanet and variant.name != "retinanet_resnet50_fpn_v2":
        raise BadValueError(f"group_norm_head: {variant.name} has a fixed torchvision head; "
                            "retinanet_resnet50_fpn_v2 is the GroupNorm one")
    kwargs = {_TORCHVISION_NAMES[k][0 if fasterrcnn else 1]: v for k, v in given.items() if k in _TORCHVISION_NAMES}
    kwargs.update({k: v for k, v in given.items() if k in _STRUCTURE_OPTIONS[:3]})
    if custom_retinanet:
        kwargs.update(group_norm_head=opts["group_norm_head"], p6p7=opts["p6p7"])
    others = {k: v for k, v in opts.items() if k not in _TORCHVISION_NAMES and k not in _STRUCTURE_OPTIONS}
    return {**kwargs, **others}


def _check_structure(variant: Variant, given: dict[str, Any]) -> None:
    structure = [k for k in _STRUCTURE_OPTIONS[:3] if k in given]
    if structure and not variant.composed:
        composed = [n for n, v in VARIANTS.items() if v.composed]
        raise BadValueError(f"{', '.join(structure)}: {variant.name} is torchvision's fixed composition; these "
                            f"options apply to {', '.join(composed)}")
    if "box_representation_size" in given and variant.arch != "fasterrcnn":
        raise BadValueError("box_representation_size is a Faster R-CNN option (RetinaNet has no box head)")
    for key in ("fpn_channels", "box_representation_size"):
        if key in given and (isinstance(given[key], bool) or given[key] < 1):
            raise BadValueError(f"{key} must be a positive int, got {given[key]!r}")


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """The transfer-learning step: a fresh last classification layer for ``num_classes`` (background included).

    Faster R-CNN: a new ``FastRCNNPredictor`` (class scores and per-class box deltas); the two-layer box head
    and the RPN keep their weights. RetinaNet: a new ``RetinaNetClassificationHead`` whose conv tower is the
    old (pretrained) one, GroupNorm included, so only ``cls_logits`` is new (torchvision's prior-probability
    init); the box regression head is untouched. Returns ``model``, changed in place.
    """
    _check_num_classes(num_classes)
    if isinstance(model, FasterRCNN):
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
    else:
        old = model.head.classification_head
        new = RetinaNetClassificationHead(old.cls_logits.in_channels, old.num_anchors, num_classes)
        new.conv = old.conv
        model.head.classification_head = new
    return model


def _expand_anchor_sizes(arch: str, sizes: list, current: tuple[tuple[int, ...], ...], variant: str):
    if all(isinstance(s, (list, tuple)) for s in sizes):
        out = tuple(tuple(int(x) for x in s) for s in sizes)
    elif arch == "retinanet":
        out = octave_sizes([int(s) for s in sizes])
    elif len(current[0]) > 1:  # MobileNet Faster R-CNN: every size on every level
        out = (tuple(int(s) for s in sizes),) * len(current)
    else:
        out = tuple((int(s),) for s in sizes)
    if len(out) != len(current):
        raise BadValueError(f"anchor_sizes={sizes}: {variant} has {len(current)} feature maps, so it needs "
                         f"{len(current)} levels of sizes (its default is {[list(s) for s in current]})")
    return out


def _set_anchors(model: nn.Module, variant: Variant, sizes: list | None, ratios: list[float] | None,
                 pretrained: bool) -> None:
    if sizes is None and ratios is None:
        return
    rpn_or_model = model.rpn if variant.arch == "fasterrcnn" else model
    current: AnchorGenerator = rpn_or_model.anchor_generator
    new_sizes = current.sizes if sizes is None else _expand_anchor_sizes(variant.arch, sizes, current.sizes,
                                                                         variant.name)
    new_ratios = current.aspect_ratios if ratios is None else (tuple(float(r) for r in ratios),) * len(new_sizes)
    generator = AnchorGenerator(new_sizes, new_ratios)
    n = generator.num_anchors_per_location()
    if len(set(n)) != 1:  # one head serves every level
        raise BadValueError(f"every level needs the same number of anchors (sizes x ratios), got {n}")
    rpn_or_model.anchor_generator = generator
    if n[0] == current.num_anchors_per_location()[0]:
        return
    if pretrained:
        warnings.warn(f"{variant.name}: {n[0]} anchors per location instead of "
                      f"{current.num_anchors_per_location()[0]}: the pretrained output convolutions of the "
                      "head are replaced by freshly initialised ones", stacklevel=3)
    # Only the last convolutions depend on the anchor count: keep the conv towers.
    if variant.arch == "fasterrcnn":
        old = model.rpn.head
        new = RPNHead(old.cls_logits.in_channels, n[0], conv_depth=len(old.conv))
        new.conv = old.conv
        model.rpn.head = new
    else:
        old_cls, old_reg = model.head.classification_head, model.head.regression_head
        cls = RetinaNetClassificationHead(old_cls.cls_logits.in_channels, n[0], old_cls.num_classes)
        reg = RetinaNetRegressionHead(old_reg.bbox_reg.in_channels, n[0])
        cls.conv, reg.conv, reg._loss_type = old_cls.conv, old_reg.conv, old_reg._loss_type
        model.head.classification_head, model.head.regression_head = cls, reg


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise BadValueError(f"num_classes must be an int >= 2: it counts the background class 0 too, so K object "
                         f"classes need num_classes=K+1; got {num_classes!r}")


def num_classes_of(model: nn.Module) -> int:
    """Number of classes (background included) the detector predicts."""
    if isinstance(model, FasterRCNN):
        return model.roi_heads.box_predictor.cls_score.out_features
    return model.head.classification_head.num_classes


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    name: partial(build_detector, v.arch, v.backbone) for name, v in VARIANTS.items()
}
"""``BUILDERS["retinanet_resnet18_fpn"](num_classes=4, ...)`` == ``build_detector("retinanet", "resnet18_fpn", 4, ...)``."""

__all__ = [
    "BUILDERS", "DETECTOR_ARGUMENTS", "backbone_body", "build_detector", "cached_weights_path", "count_parameters",
    "freeze_backbone_layers", "list_variants", "load_state_dict_file", "num_classes_of", "replace_head",
    "use_channels_last",
]
