"""Builders for torchvision Faster R-CNN (two-stage) and RetinaNet (one-stage) detectors.

One entry point, :func:`build_detector`, covers

* torchvision's own variants: Faster R-CNN ``resnet50_fpn``, ``resnet50_fpn_v2``, ``mobilenet_v3_large_fpn``,
  ``mobilenet_v3_large_320_fpn``; RetinaNet ``resnet50_fpn``, ``resnet50_fpn_v2``;
* both detector types on the same smaller backbones (``resnet18_fpn``, ``resnet34_fpn``, and RetinaNet on
  ``mobilenet_v3_large_fpn``), composed from torchvision's parts the way its builders compose resnet50, so a
  one-stage/two-stage comparison can hold the backbone fixed.

Weights follow torchvision's meaning: ``weights`` names a COCO detector weights enum member ("DEFAULT",
"COCO_V1"), ``weights_backbone`` an ImageNet one ("DEFAULT", "IMAGENET1K_V1"); when ``weights`` is given,
``weights_backbone`` is ignored (the detector file holds the backbone too), as in torchvision. Files come
through ``Weights.get_state_dict`` -> ``torch.hub.load_state_dict_from_url``, which reads
``<torch.hub.get_dir()>/checkpoints/<file name of the URL>`` (``$TORCH_HOME/hub/checkpoints``) before trying
the network, so placing the file there works offline. ``weights_path`` loads a full-detector state dict from
a local file instead. Unlike torchvision's builders, nothing is pretrained unless asked for: torchvision
defaults ``weights_backbone`` to ImageNet for some variants, which would need the network.

Pretrained models are built the way torchvision builds them: the untrained structure from torchvision's
builder (or the composition below), then, because weights are loaded, BatchNorm in the backbone body becomes
``FrozenBatchNorm2d`` (not for the ``_v2`` variants, which keep BatchNorm) and all but the last
``trainable_backbone_layers`` body stages are frozen. Loading is done here, with ``weights_only=True``,
rather than by torchvision's builders, which unpickle the cached file with ``weights_only=False``.

Inputs and outputs are torchvision's: a list of float images ``[3, H, W]`` in 0..1; targets with
``boxes`` float32 ``[N, 4]`` XYXY absolute pixels and ``labels`` int64 ``[N]`` in 1..K (0 = background, so
``num_classes = K + 1``). Train mode returns a dict of scalar losses, eval mode a list of dicts with
``boxes [D, 4]`` (XYXY), ``labels [D]``, ``scores [D]``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum, get_model_weights
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
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _validate_trainable_layers
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

Arch = Literal["fasterrcnn", "retinanet"]

_FASTER_RCNN_CLS_KEY = "roi_heads.box_predictor.cls_score.weight"
_RETINANET_CLS_KEY = "head.classification_head.cls_logits.weight"
_RETINANET_REG_KEY = "head.regression_head.bbox_reg.weight"


# ----------------------------------------------------------------------------------------------------------
# Untrained structures: BatchNorm everywhere, every layer trainable. Weights and freezing come afterwards.


def _torchvision(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int, **kwargs: Any) -> nn.Module:
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)

    return build


def _octave_sizes(base: list[int]) -> tuple[tuple[int, ...], ...]:
    # RetinaNet paper / torchvision: three scales per level, 2^0, 2^(1/3), 2^(2/3) of the base size.
    return tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in base)


def _body(backbone_name: str) -> nn.Module:
    if backbone_name.startswith("mobilenet"):
        # As torchvision's detection builders: plain BatchNorm2d (eps 1e-5, momentum 0.1) instead of the
        # classifier's (1e-3, 0.01), whose slow running statistics make a from-scratch model useless in
        # eval mode for its first few hundred steps.
        return getattr(torchvision.models, backbone_name)(norm_layer=nn.BatchNorm2d).features
    return getattr(torchvision.models, backbone_name)()


def _fpn_backbone(backbone_name: str, returned_layers: list[int] | None, channels: int,
                  extra_blocks: nn.Module | None = None) -> BackboneWithFPN:
    """Body + FPN exactly as torchvision's ``_resnet_fpn_extractor``/``_mobilenet_extractor`` compose them,
    with the FPN width and the stages that feed it configurable.

    ``returned_layers``: ResNet stages 1..4 (``layer1`` has stride 4 ... ``layer4`` stride 32; default all
    four); MobileNetV3 stages 0..5 as torchvision numbers them (each stage's first block; strides 2, 4, 8,
    16, 32, 32; default [4, 5], torchvision's choice for 800-px COCO images, whose finest map has stride
    32 -- [2, 3, 5] adds stride 8 and 16 maps for small objects in small images).
    """
    body = _body(backbone_name)
    if backbone_name.startswith("resnet"):
        stages, default = [1, 2, 3, 4], [1, 2, 3, 4]
    else:
        starts = _mobilenet_stages(body)
        stages, default = list(range(len(starts))), [len(starts) - 2, len(starts) - 1]
    layers = list(default if returned_layers is None else returned_layers)
    if not layers or layers != sorted(set(layers)) or not set(layers) <= set(stages):
        raise ValueError(f"returned_layers={returned_layers} for {backbone_name}: give increasing stage numbers "
                         f"from {stages}")
    if backbone_name.startswith("resnet"):
        return_layers = {f"layer{k}": str(v) for v, k in enumerate(layers)}
        in_channels = [body.inplanes // 8 * 2 ** (k - 1) for k in layers]
    else:
        return_layers = {str(starts[k]): str(v) for v, k in enumerate(layers)}
        in_channels = [body[starts[k]].out_channels for k in layers]
    return BackboneWithFPN(body, return_layers, in_channels, channels, extra_blocks=extra_blocks)


def _fasterrcnn(backbone_name: str, **defaults: Any) -> Callable[..., nn.Module]:
    def build(num_classes: int, fpn_channels: int | None = None, returned_layers: list[int] | None = None,
              box_representation_size: int | None = None, **kwargs: Any) -> nn.Module:
        # torchvision's fasterrcnn_resnet50_fpn / _fasterrcnn_mobilenet_v3_large_fpn compositions: C2-C5 +
        # max-pool level with one anchor size per map (ResNet); two stride-32 maps + max-pool with every size
        # on every map (MobileNetV3). Same module names, so torchvision's COCO files load.
        backbone = _fpn_backbone(backbone_name, returned_layers, fpn_channels or 256)
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
        backbone = _fpn_backbone(backbone_name, returned_layers, channels, extra)
        if not p6p7:
            backbone.fpn.extra_blocks = None  # BackboneWithFPN would add a max-pool level in their place
        n = len(returned_layers) + (2 if p6p7 else 0)
        anchors = AnchorGenerator(_octave_sizes([32 * 2**i for i in range(n)]), ((0.5, 1.0, 2.0),) * n)
        # GroupNorm(32) in the head towers, as retinanet_resnet50_fpn_v2: trains far better from scratch.
        norm = partial(nn.GroupNorm, 32) if group_norm_head else None
        head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **kwargs)

    return build


@dataclass(frozen=True)
class _Variant:
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
    _Variant("fasterrcnn", "resnet50_fpn", _torchvision(fasterrcnn_resnet50_fpn), "resnet50", True,
             FasterRCNN_ResNet50_FPN_Weights.COCO_V1),
    _Variant("fasterrcnn", "resnet50_fpn_v2", _torchvision(fasterrcnn_resnet50_fpn_v2), "resnet50", False),
    # Composed as torchvision's own builders compose them (test_models checks the two are the same), so that
    # the FPN's stages and width can change: torchvision's default sees only stride-32 maps.
    _Variant("fasterrcnn", "mobilenet_v3_large_fpn", _fasterrcnn("mobilenet_v3_large", rpn_score_thresh=0.05),
             "mobilenet_v3_large", True, composed=True),
    _Variant("fasterrcnn", "mobilenet_v3_large_320_fpn",
             _fasterrcnn("mobilenet_v3_large", rpn_score_thresh=0.05, **_MOBILENET_320),
             "mobilenet_v3_large", True, composed=True),
    _Variant("fasterrcnn", "resnet18_fpn", _fasterrcnn("resnet18"), "resnet18", True, custom=True, composed=True),
    _Variant("fasterrcnn", "resnet34_fpn", _fasterrcnn("resnet34"), "resnet34", True, custom=True, composed=True),
    _Variant("retinanet", "resnet50_fpn", _torchvision(retinanet_resnet50_fpn), "resnet50", True,
             RetinaNet_ResNet50_FPN_Weights.COCO_V1),
    _Variant("retinanet", "resnet50_fpn_v2", _torchvision(retinanet_resnet50_fpn_v2), "resnet50", False),
    _Variant("retinanet", "resnet18_fpn", _retinanet("resnet18"), "resnet18", True, custom=True, composed=True),
    _Variant("retinanet", "resnet34_fpn", _retinanet("resnet34"), "resnet34", True, custom=True, composed=True),
    _Variant("retinanet", "mobilenet_v3_large_fpn", _retinanet("mobilenet_v3_large"), "mobilenet_v3_large",
             True, custom=True, composed=True),
]
_VARIANTS: dict[str, _Variant] = {v.name: v for v in _VARIANT_LIST}


def list_variants(arch: Arch | None = None) -> list[str]:
    """Variant names ``"<arch>_<backbone>"`` (e.g. ``"retinanet_resnet18_fpn"``), optionally of one arch."""
    return [name for name, v in _VARIANTS.items() if arch is None or v.arch == arch]


def _variant(arch: str, backbone: str) -> _Variant:
    name = f"{arch}_{backbone}"
    if name not in _VARIANTS:
        raise ValueError(f"unknown detector variant {name!r} (arch={arch!r}, backbone={backbone!r}); "
                         f"valid variants: {', '.join(list_variants())}")
    return _VARIANTS[name]


# ----------------------------------------------------------------------------------------------------------
# Weights


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` looks for ``weights`` before downloading."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _resolve_weights(enum_cls: type[WeightsEnum], value: str | WeightsEnum, what: str) -> WeightsEnum:
    try:
        return enum_cls.verify(value)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{what}={value!r} is not one of {enum_cls.__name__}'s weights: "
                         f"{', '.join(enum_cls.__members__)}") from e


def _fetch_state_dict(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's own mechanism (hub cache first, then download), but unpickling with weights_only=True."""
    path = cached_weights_path(weights)
    was_cached = path.is_file()
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- only a download and a torch.load happen in there
        if was_cached:
            raise RuntimeError(f"cannot read the cached weights file {path} ({weights}): {type(e).__name__}: {e}. "
                               "Delete it to download again, or pass weights_path=<a local .pth>.") from e
        raise FileNotFoundError(
            f"{weights} is not in the torch hub cache and could not be downloaded ({type(e).__name__}: {e}). "
            f"Offline, download {weights.url} elsewhere and place it at {path} "
            f"(torch.hub.get_dir() follows $TORCH_HOME), or pass weights_path=<a local .pth state dict>."
        ) from e


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A full-detector state dict from ``path``: a ``torch.save(model.state_dict())`` file, or a Lightning
    checkpoint whose ``state_dict`` holds the detector under a ``model.`` prefix. Read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same clear message
        raise ValueError(f"weights_path {path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights_path {path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    if not any(k.startswith("backbone.") for k in obj) and any(k.startswith("model.") for k in obj):
        obj = {k.removeprefix("model."): v for k, v in obj.items() if k.startswith("model.")}
    return obj


def _classes_in_state_dict(state: dict[str, torch.Tensor], arch: str, path: Path) -> int:
    key = _FASTER_RCNN_CLS_KEY if arch == "fasterrcnn" else _RETINANET_CLS_KEY
    if key not in state or (arch == "retinanet" and _RETINANET_REG_KEY not in state):
        raise ValueError(f"weights_path {path}: not a {arch} state dict (no key {key!r}); "
                         f"its first keys: {list(state)[:5]}")
    if arch == "fasterrcnn":
        return state[key].shape[0]
    anchors = state[_RETINANET_REG_KEY].shape[0] // 4  # bbox_reg has 4 outputs per anchor
    return state[key].shape[0] // anchors


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        # torch's message lists every key; name the file and the first few offenders of each kind instead.
        own = model.state_dict()
        skip = ("num_batches_tracked",)  # BatchNorm <-> FrozenBatchNorm2d files differ only in these
        missing = [k for k in own if k not in state and not k.endswith(skip)]
        unexpected = [k for k in state if k not in own and not k.endswith(skip)]
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
        raise ValueError(f"{source} does not fit this model: missing keys {missing[:5]} ({len(missing)}), "
                         f"unexpected keys {unexpected[:5]} ({len(unexpected)}), shape mismatches {shapes[:5]} "
                         f"({len(shapes)})") from e


# ----------------------------------------------------------------------------------------------------------
# Backbone freezing, head surgery, anchors


def backbone_body(model: nn.Module) -> nn.Module:
    """The detector's feature extractor without FPN: torchvision's ``IntermediateLayerGetter`` over a ResNet
    (children ``conv1, bn1, relu, maxpool, layer1..layer4``, the ResNet's own key names, no ``fc``) or over
    MobileNetV3's ``features`` (children ``"0".."16"``, i.e. ``features.<i>`` keys without the prefix)."""
    return model.backbone.body


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def use_channels_last(model: nn.Module) -> nn.Module:
    """Store the detector's 4-D weights, and feed its backbone, in NHWC (``torch.channels_last``) layout.

    Same numbers, other memory order: oneDNN convolutions on CPUs and tensor-core convolutions on GPUs run
    faster on NHWC, above all the depthwise convolutions of MobileNetV3 (docs/benchmarks.md: the demo's
    MobileNetV3-FPN detectors train 1.1-1.3x faster per step on 2 CPU cores). The batched input torchvision's
    transform builds is NCHW, hence the hook on the backbone; every later activation inherits the layout
    from its convolution. Returns ``model`` (converted in place).
    """
    model.to(memory_format=torch.channels_last)
    model.backbone.register_forward_pre_hook(_channels_last_input)  # a module-level function pickles (DDP spawn)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` number of parameter elements."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _mobilenet_stages(body: nn.Module) -> list[int]:
    blocks = list(body.children())
    # Same rule as torchvision's _mobilenet_extractor: first block, strided blocks, last block.
    return [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]


def freeze_backbone_layers(body: nn.Module, trainable_layers: int) -> None:
    """Make only the last ``trainable_layers`` stages of a backbone body trainable, with torchvision's rule.

    ResNet body (or a torchvision ResNet): stages ``layer4, layer3, layer2, layer1, conv1`` counted from the
    top, ``bn1`` trainable only with all 5 (a ResNet's ``fc`` is not a stage and gets frozen). MobileNetV3
    body: stage starts are block 0, the strided blocks and the last block; 0..6 stages. Sets
    ``requires_grad`` both ways, so calling it again with another value re-freezes or unfreezes.
    """
    resnet = hasattr(body, "layer4")
    starts = [] if resnet else _mobilenet_stages(body)
    limit = 5 if resnet else len(starts)
    if isinstance(trainable_layers, bool) or not 0 <= trainable_layers <= limit:
        raise ValueError(f"trainable_backbone_layers must be in [0, {limit}], got {trainable_layers}")
    if resnet:
        stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            stages.append("bn1")
    else:
        first = len(list(body.children())) if trainable_layers == 0 else starts[limit - trainable_layers]
        stages = [name for i, (name, _) in enumerate(body.named_children()) if i >= first]
    for name, p in body.named_parameters():
        p.requires_grad_(any(name == s or name.startswith(s + ".") for s in stages))


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d below ``module`` with FrozenBatchNorm2d, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            # Default eps (1e-5), as torchvision gets when it passes norm_layer=FrozenBatchNorm2d (MobileNetV3's
            # own BatchNorm uses 1e-3, which torchvision's pretrained detectors do not keep).
            frozen = FrozenBatchNorm2d(child.num_features)
            with torch.no_grad():
                for buf in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, buf).copy_(getattr(child, buf))
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def take_frozen_bn_eps(body: nn.Module, donor: nn.Module) -> float | None:
    """Give every FrozenBatchNorm2d of ``body`` the eps of the norm layer of the same name in ``donor``, the
    model its statistics were copied from; returns that eps (None: no FrozenBatchNorm2d).

    The statistics only mean what they meant in training under the same eps: a MobileNetV3 trained with
    BatchNorm's 1e-3 and frozen with FrozenBatchNorm2d's default 1e-5 scales its low-variance channels
    several times too much, and a detector on such a body collapses (docs/benchmarks.md, tenth session).
    The state dict holds no eps, so callers record the value for rebuilding (one per body)."""
    donors = dict(donor.named_modules())
    found = set()
    for name, module in body.named_modules():
        eps = getattr(donors.get(name), "eps", None)
        if isinstance(module, FrozenBatchNorm2d) and eps is not None:
            module.eps = float(eps)
            found.add(float(eps))
    if len(found) > 1:
        raise ValueError(f"the donor body's norm layers use several eps ({sorted(found)}); a frozen copy of it "
                         "could not be rebuilt from one frozen_bn_eps")
    return found.pop() if found else None


def num_classes_of(model: nn.Module) -> int:
    """Number of classes (background included) the detector predicts."""
    if isinstance(model, FasterRCNN):
        return model.roi_heads.box_predictor.cls_score.out_features
    return model.head.classification_head.num_classes


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
        out = _octave_sizes([int(s) for s in sizes])
    elif len(current[0]) > 1:  # MobileNet Faster R-CNN: every size on every level
        out = (tuple(int(s) for s in sizes),) * len(current)
    else:
        out = tuple((int(s),) for s in sizes)
    if len(out) != len(current):
        raise ValueError(f"anchor_sizes={sizes}: {variant} has {len(current)} feature maps, so it needs "
                         f"{len(current)} levels of sizes (its default is {[list(s) for s in current]})")
    return out


def _set_anchors(model: nn.Module, variant: _Variant, sizes: list | None, ratios: list[float] | None,
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
        raise ValueError(f"every level needs the same number of anchors (sizes x ratios), got {n}")
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
        raise ValueError(f"num_classes must be an int >= 2: it counts the background class 0 too, so K object "
                         f"classes need num_classes=K+1; got {num_classes!r}")


# ----------------------------------------------------------------------------------------------------------


def build_detector(
    arch: Arch,
    backbone: str = "resnet50_fpn",
    num_classes: int = 91,
    *,
    weights: str | None = None,
    weights_backbone: str | None = None,
    weights_path: str | None = None,
    trainable_backbone_layers: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    anchor_sizes: list[list[int]] | list[int] | None = None,
    aspect_ratios: list[float] | None = None,
    rpn_pre_nms_top_n_train: int | None = None,
    rpn_pre_nms_top_n_test: int | None = None,
    rpn_post_nms_top_n_train: int | None = None,
    rpn_post_nms_top_n_test: int | None = None,
    rpn_score_thresh: float | None = None,
    box_batch_size_per_image: int | None = None,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    detections_per_img: int = 100,
    group_norm_head: bool = False,
    p6p7: bool = True,
    fpn_channels: int | None = None,
    returned_layers: list[int] | None = None,
    box_representation_size: int | None = None,
    pretrained_layout: bool = False,
    frozen_bn_eps: float | None = None,
    **kwargs: Any,
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
            legacy ``fasterrcnn_resnet50_fpn``/``retinanet_resnet50_fpn`` COCO_V1 file gets its eps=0 too.
        trainable_backbone_layers: body stages left trainable, counted from the top: 0..5 for ResNet, 0..6
            for MobileNetV3; default 3. As in torchvision it only applies to pretrained models: without any
            weights every layer trains (torchvision warns if a value was given).
        min_size, max_size: image resize bounds of ``GeneralizedRCNNTransform``; None = the variant's
            torchvision default (800/1333; 320/640 for ``mobilenet_v3_large_320_fpn``).
        anchor_sizes: per feature map, a list of sizes; or a flat list of one base size per level expanded as
            the variant's default is (Faster R-CNN ResNet: one size per level; Faster R-CNN MobileNet: all
            sizes on every level; RetinaNet: sizes x 2^0, 2^(1/3), 2^(2/3) per level). Changing the number of
            anchors per location re-initialises the head's output convolutions.
        aspect_ratios: height/width ratios used on every level (default 0.5, 1, 2).
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
            P7 are 3 x 3 and 2 x 2 maps (docs/benchmarks.md: 15% of a demo step, no accuracy).
        fpn_channels, returned_layers: width of the FPN (and so of the heads; torchvision: 256) and the body
            stages feeding it (see ``_fpn_backbone``: ResNet 1..4, MobileNetV3 0..5). Variants composed here
            only (every one except the ``resnet50`` ones); the head and the default anchors follow the number
            of feature maps. Changes the structure, so COCO detector weights no longer fit (ImageNet
            ``weights_backbone`` still does).
        box_representation_size: width of Faster R-CNN's two-layer box head (torchvision: 1024); its first
            layer has ``fpn_channels * 7 * 7 * box_representation_size`` weights.
        pretrained_layout: build the structure a pretrained model has (FrozenBatchNorm2d, frozen stages)
            without loading any weights -- what ``load_model`` needs to rebuild a saved model offline.
        frozen_bn_eps: eps of the FrozenBatchNorm2d layers (torchvision loads its legacy COCO_V1 files with
            0); None keeps the default or what the weights imply. See :func:`frozen_bn_eps_of`.
        **kwargs: passed to torchvision's ``FasterRCNN``/``RetinaNet`` constructor.
    """
    variant = _variant(arch, backbone)
    _check_num_classes(num_classes)
    if weights_path is not None and (weights is not None or weights_backbone is not None):
        raise ValueError("weights_path loads a whole detector: give it alone, without weights/weights_backbone")
    options = _constructor_options(variant, kwargs, group_norm_head=group_norm_head, p6p7=p6p7, min_size=min_size,
                                   max_size=max_size, rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
                                   rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
                                   rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
                                   rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
                                   rpn_score_thresh=rpn_score_thresh,
                                   box_batch_size_per_image=box_batch_size_per_image, score_thresh=score_thresh,
                                   nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                                   fpn_channels=fpn_channels, returned_layers=returned_layers,
                                   box_representation_size=box_representation_size)

    detector_weights = None
    if weights is not None:
        if variant.custom:
            pretrained = [n for n, v in _VARIANTS.items() if not v.custom]
            raise ValueError(f"torchvision has no COCO weights for {variant.name} (it has them for "
                             f"{', '.join(pretrained)}); use weights_backbone or weights_path")
        detector_weights = _resolve_weights(get_model_weights(f"{variant.name}"), weights, "weights")
    backbone_weights = None
    if weights_backbone is not None and detector_weights is None:
        backbone_weights = _resolve_weights(get_model_weights(variant.backbone_fn), weights_backbone,
                                            "weights_backbone")

    state, source = None, ""
    built_classes = num_classes
    if weights_path is not None:
        source = f"weights_path {weights_path}"
        state = load_state_dict_file(weights_path)
        built_classes = _classes_in_state_dict(state, variant.arch, Path(weights_path))
    elif detector_weights is not None:
        source = f"{detector_weights} ({cached_weights_path(detector_weights)})"
        built_classes = len(detector_weights.meta["categories"])

    pretrained = state is not None or detector_weights is not None or backbone_weights is not None
    pretrained = pretrained or pretrained_layout
    layers = _validate_trainable_layers(pretrained, trainable_backbone_layers, variant.max_trainable_layers, 3)

    model = variant.structure(built_classes, **options)
    if state is not None:  # a file of a model trained with custom anchors has their head shapes
        _set_anchors(model, variant, anchor_sizes, aspect_ratios, pretrained=False)
    if pretrained:
        body = backbone_body(model)
        if variant.frozen_bn:
            _freeze_batchnorm(body)
        freeze_backbone_layers(body, layers)
    if backbone_weights is not None:
        _load_backbone(body, _fetch_state_dict(backbone_weights), backbone_weights)
    if detector_weights is not None:
        state = _fetch_state_dict(detector_weights)
    if state is not None:
        _load_checked(model, state, source)
    if frozen_bn_eps is None and state is not None:
        frozen_bn_eps = frozen_bn_eps_of(arch, backbone, weights, weights_path)
    if frozen_bn_eps is not None:
        overwrite_eps(model, frozen_bn_eps)  # torchvision uses 0 for its legacy COCO_V1 files
    if weights_path is None:
        _set_anchors(model, variant, anchor_sizes, aspect_ratios, pretrained=detector_weights is not None)
    if built_classes != num_classes:
        replace_head(model, num_classes)
    return model


def frozen_bn_eps_of(arch: str, backbone: str, weights: str | None, weights_path: str | None) -> float | None:
    """0.0 when these weights are one of torchvision's legacy files it loads with FrozenBatchNorm eps=0."""
    variant = _variant(arch, backbone)
    eps0 = variant.eps0_weights
    if eps0 is None:
        return None
    if weights is not None and not variant.custom:
        if _resolve_weights(get_model_weights(variant.name), weights, "weights") == eps0:
            return 0.0
    if weights_path is not None and Path(weights_path).name == Path(eps0.url).name:
        return 0.0
    return None


def _load_backbone(body: nn.Module, state: dict[str, torch.Tensor], weights: WeightsEnum) -> None:
    # ImageNet files hold the whole classifier: the body has the ResNet's keys without fc, or MobileNetV3's
    # features.* keys without the prefix.
    if hasattr(body, "layer4"):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    else:
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    _load_checked(body, state, f"{weights} ({cached_weights_path(weights)})")


def _constructor_options(variant: _Variant, kwargs: dict[str, Any], **args: Any) -> dict[str, Any]:
    """Map build_detector's arguments to torchvision's constructor names, leaving out the unset ones."""
    for reserved in ("anchor_generator", "rpn_anchor_generator", "head", "rpn_head", "box_predictor"):
        if reserved in kwargs:
            raise ValueError(f"{reserved} is built here: use anchor_sizes/aspect_ratios/num_classes instead")
    rpn_args = ["rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
                "rpn_post_nms_top_n_test", "rpn_score_thresh", "box_batch_size_per_image"]
    if variant.arch == "fasterrcnn":
        names = {**{a: a for a in rpn_args}, "score_thresh": "box_score_thresh", "nms_thresh": "box_nms_thresh",
                 "detections_per_img": "box_detections_per_img"}
        if args["group_norm_head"]:
            raise ValueError("group_norm_head is a RetinaNet option (Faster R-CNN v2 already has BatchNorm heads)")
    else:
        names = {"score_thresh": "score_thresh", "nms_thresh": "nms_thresh",
                 "detections_per_img": "detections_per_img"}
        given = [a for a in rpn_args if args[a] is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: Faster R-CNN options, RetinaNet has no RPN or ROI sampling")
    structure = {k: args[k] for k in ("fpn_channels", "returned_layers", "box_representation_size")
                 if args[k] is not None}
    if structure and not variant.composed:
        composed = [n for n, v in _VARIANTS.items() if v.composed]
        raise ValueError(f"{', '.join(structure)}: {variant.name} is torchvision's fixed composition; these "
                         f"options apply to {', '.join(composed)}")
    if "box_representation_size" in structure and variant.arch != "fasterrcnn":
        raise ValueError("box_representation_size is a Faster R-CNN option (RetinaNet has no box head)")
    for key in ("fpn_channels", "box_representation_size"):
        if key in structure and (isinstance(structure[key], bool) or structure[key] < 1):
            raise ValueError(f"{key} must be a positive int, got {structure[key]!r}")
    options = {tv: args[ours] for ours, tv in names.items() if args[ours] is not None}
    options.update(structure)
    options.update({k: args[k] for k in ("min_size", "max_size") if args[k] is not None})
    if not args["p6p7"] and not (variant.arch == "retinanet" and variant.custom):  # where it is passed on below
        raise ValueError(f"p6p7=False: a RetinaNet option of the composed backbones; {variant.name} has fixed levels")
    if variant.custom and variant.arch == "retinanet":
        options["group_norm_head"] = args["group_norm_head"]
        options["p6p7"] = args["p6p7"]
    elif args["group_norm_head"] and variant.name != "retinanet_resnet50_fpn_v2":
        raise ValueError(f"group_norm_head: {variant.name} has a fixed torchvision head; "
                         "retinanet_resnet50_fpn_v2 is the GroupNorm one")
    return {**options, **kwargs}


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    name: partial(build_detector, v.arch, v.backbone) for name, v in _VARIANTS.items()
}
"""``BUILDERS["retinanet_resnet18_fpn"](num_classes=4, ...)`` == ``build_detector("retinanet", "resnet18_fpn", 4, ...)``."""

__all__ = [
    "BUILDERS", "backbone_body", "build_detector", "cached_weights_path", "count_parameters",
    "freeze_backbone_layers", "list_variants", "load_state_dict_file", "num_classes_of", "replace_head",
]

