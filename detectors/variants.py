"""The detector variants: one record per ``"<arch>_<backbone>"`` name, torchvision models/detection style.

* torchvision's own variants: Faster R-CNN ``resnet50_fpn``, ``resnet50_fpn_v2``, ``mobilenet_v3_large_fpn``,
  ``mobilenet_v3_large_320_fpn``; RetinaNet ``resnet50_fpn``, ``resnet50_fpn_v2``;
* both detector types on the same smaller backbones (``resnet18_fpn``, ``resnet34_fpn``, and RetinaNet on
  ``mobilenet_v3_large_fpn``), composed from torchvision's parts the way its builders compose resnet50, so a
  one-stage/two-stage comparison can hold the backbone fixed.

A record's ``structure`` builds the untrained model: BatchNorm everywhere, every layer trainable. Pretrained
weights, frozen layers and the options that are not structure are ``detectors.models.build_detector``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_ResNet50_FPN_Weights,
    RetinaNet,
    RetinaNet_ResNet50_FPN_Weights,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from training.errors import BadValueError

from .backbones import fpn_backbone

Arch = Literal["fasterrcnn", "retinanet"]


def _torchvision(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs: Any) -> nn.Module:
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)

    return build


def octave_sizes(base: list[int]) -> tuple[tuple[int, ...], ...]:
    """RetinaNet's anchor sizes per level (the paper's, torchvision's): 2^0, 2^(1/3), 2^(2/3) x the base size."""
    return tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in base)


def _fasterrcnn(backbone_name: str, **defaults: Any) -> Callable[..., nn.Module]:
    def build(num_classes: int, fpn_channels: int | None = None, returned_layers: list[int] | None = None,
              box_representation_size: int | None = None, **kwargs: Any) -> nn.Module:
        # torchvision's fasterrcnn_resnet50_fpn / _fasterrcnn_mobilenet_v3_large_fpn compositions: C2-C5 +
        # max-pool level with one anchor size per map (ResNet); two stride-32 maps + max-pool with every size
        # on every map (MobileNetV3). Same module names, so torchvision's COCO files load.
        backbone = fpn_backbone(backbone_name, returned_layers, fpn_channels or 256)
        n = len(backbone.body.return_layers) + 1
        if backbone_name.startswith("resnet"):
            sizes = tuple((32 * 2**i,) for i in range(n))
        else:
            sizes = ((32, 64, 128, 256, 512),) * n
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * n)
        if box_representation_size is not None:  # the two-layer box head's width (torchvision: 1024)
            box_head = TwoMLPHead(backbone.out_channels * 7 * 7, box_representation_size)
            kwargs.update(box_head=box_head, box_predictor=FastRCNNPredictor(box_representation_size, num_classes))
            num_classes = None
        return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **{**defaults, **kwargs})

    return build


def _retinanet(backbone_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, group_norm_head: bool = False, fpn_channels: int | None = None,
              returned_layers: list[int] | None = None, p6p7: bool = True, **kwargs: Any) -> nn.Module:
        # P3-P5 from the body, P6-P7 from P5 (LastLevelP6P7) as in retinanet_resnet50_fpn; MobileNetV3's
        # default is its stride 8, 16 and 32 stages.
        channels = fpn_channels or 256
        if returned_layers is None:
            returned_layers = [2, 3, 4] if backbone_name.startswith("resnet") else [2, 3, 5]
        extra = LastLevelP6P7(channels, channels) if p6p7 else None
        backbone = fpn_backbone(backbone_name, returned_layers, channels, extra)
        if not p6p7:
            backbone.fpn.extra_blocks = None  # BackboneWithFPN would add a max-pool level in their place
        n = len(returned_layers) + (2 if p6p7 else 0)
        anchors = AnchorGenerator(octave_sizes([32 * 2**i for i in range(n)]), ((0.5, 1.0, 2.0),) * n)
        # GroupNorm(32) in the head towers, as retinanet_resnet50_fpn_v2: trains far better from scratch.
        norm = partial(nn.GroupNorm, 32) if group_norm_head else None
        head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **kwargs)

    return build


@dataclass(frozen=True)
class Variant:
    arch: str
    backbone: str
    structure: Callable[..., nn.Module]  # (num_classes, **kwargs) -> untrained model
    backbone_fn: str  # torchvision classification builder of the body: its ImageNet weights enum
    frozen_bn: bool  # torchvision swaps the body's BatchNorm for FrozenBatchNorm2d when pretrained
    eps0_weights: WeightsEnum | None = None  # legacy weights torchvision loads with FrozenBatchNorm eps=0
    custom: bool = False  # composed here: no COCO weights exist
    composed: bool = False  # built by _fasterrcnn/_retinanet: FPN width and returned stages configurable

    @property
    def name(self) -> str:
        return f"{self.arch}_{self.backbone}"

    @property
    def max_trainable_layers(self) -> int:
        return 6 if self.backbone_fn.startswith("mobilenet") else 5


_MOBILENET_320 = dict(min_size=320, max_size=640, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150)
_VARIANT_LIST = [
    Variant("fasterrcnn", "resnet50_fpn", _torchvision(fasterrcnn_resnet50_fpn), "resnet50", True,
            FasterRCNN_ResNet50_FPN_Weights.COCO_V1),
    Variant("fasterrcnn", "resnet50_fpn_v2", _torchvision(fasterrcnn_resnet50_fpn_v2), "resnet50", False),
    # Composed as torchvision's own builders compose them (test_variants checks the two are the same), so that
    # the FPN's stages and width can change: torchvision's default sees only stride-32 maps.
    Variant("fasterrcnn", "mobilenet_v3_large_fpn", _fasterrcnn("mobilenet_v3_large", rpn_score_thresh=0.05),
            "mobilenet_v3_large", True, composed=True),
    Variant("fasterrcnn", "mobilenet_v3_large_320_fpn",
            _fasterrcnn("mobilenet_v3_large", rpn_score_thresh=0.05, **_MOBILENET_320),
            "mobilenet_v3_large", True, composed=True),
    Variant("fasterrcnn", "resnet18_fpn", _fasterrcnn("resnet18"), "resnet18", True, custom=True, composed=True),
    Variant("fasterrcnn", "resnet34_fpn", _fasterrcnn("resnet34"), "resnet34", True, custom=True, composed=True),
    Variant("retinanet", "resnet50_fpn", _torchvision(retinanet_resnet50_fpn), "resnet50", True,
            RetinaNet_ResNet50_FPN_Weights.COCO_V1),
    Variant("retinanet", "resnet50_fpn_v2", _torchvision(retinanet_resnet50_fpn_v2), "resnet50", False),
    Variant("retinanet", "resnet18_fpn", _retinanet("resnet18"), "resnet18", True, custom=True, composed=True),
    Variant("retinanet", "resnet34_fpn", _retinanet("resnet34"), "resnet34", True, custom=True, composed=True),
    Variant("retinanet", "mobilenet_v3_large_fpn", _retinanet("mobilenet_v3_large"), "mobilenet_v3_large",
            True, custom=True, composed=True),
]
VARIANTS: dict[str, Variant] = {v.name: v for v in _VARIANT_LIST}


def list_variants(arch: Arch | None = None) -> list[str]:
    """Variant names ``"<arch>_<backbone>"`` (e.g. ``"retinanet_resnet18_fpn"``), optionally of one arch."""
    return [name for name, v in VARIANTS.items() if arch is None or v.arch == arch]


def find_variant(arch: str, backbone: str) -> Variant:
    """The record of ``arch`` on ``backbone``; refuses an unknown pair, listing the valid ones."""
    name = f"{arch}_{backbone}"
    if name not in VARIANTS:
        raise BadValueError(f"unknown detector variant {name!r} (arch={arch!r}, backbone={backbone!r}); "
                            f"valid variants: {', '.join(list_variants())}")
    return VARIANTS[name]
