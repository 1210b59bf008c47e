"""Backbones of the composed detectors: a torchvision classification body plus a feature pyramid (FPN), and
the body-level operations every detector shares (stage freezing, FrozenBatchNorm2d, NHWC layout).

The composition repeats torchvision's ``_resnet_fpn_extractor``/``_mobilenet_extractor`` with two settings
they fix: the FPN width and the body stages that feed it. Module names are torchvision's, so its COCO and
ImageNet files load, and a body's state dict is a classifier's (``classifiers.backbones``).

A body (``model.backbone.body``) is torchvision's ``IntermediateLayerGetter`` over a ResNet (children
``conv1, bn1, relu, maxpool, layer1..layer4``) or over MobileNetV3's ``features`` (children ``"0".."16"``).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.misc import FrozenBatchNorm2d

from training.errors import BadValueError


def _body(backbone_name: str) -> nn.Module:
    if backbone_name.startswith("mobilenet"):
        # As torchvision's detection builders: plain BatchNorm2d (eps 1e-5, momentum 0.1) instead of the
        # classifier's (1e-3, 0.01), whose slow running statistics make a from-scratch model useless in
        # eval mode for its first few hundred steps.
        return getattr(torchvision.models, backbone_name)(norm_layer=nn.BatchNorm2d).features
    return getattr(torchvision.models, backbone_name)()


def mobilenet_stages(body: nn.Module) -> list[int]:
    """Indices of the blocks that start MobileNetV3's stages: as torchvision's ``_mobilenet_extractor``, the
    first block, the strided blocks and the last block."""
    blocks = list(body.children())
    return [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]


def fpn_backbone(backbone_name: str, returned_layers: list[int] | None, channels: int,
                 extra_blocks: nn.Module | None = None) -> BackboneWithFPN:
    """Body + FPN exactly as torchvision composes them, with the FPN width and the stages that feed it
    configurable.

    ``returned_layers``: ResNet stages 1..4 (``layer1`` has stride 4 ... ``layer4`` stride 32; default all
    four); MobileNetV3 stages 0..5 as torchvision numbers them (each stage's first block; strides 2, 4, 8,
    16, 32, 32; default [4, 5], torchvision's choice for 800-px COCO images, whose finest map has stride
    32 -- [2, 3, 5] adds stride 8 and 16 maps for small objects in small images).
    """
    body = _body(backbone_name)
    resnet = backbone_name.startswith("resnet")
    starts = [] if resnet else mobilenet_stages(body)
    stages = [1, 2, 3, 4] if resnet else list(range(len(starts)))
    default = stages if resnet else stages[-2:]
    layers = list(default if returned_layers is None else returned_layers)
    if not layers or layers != sorted(set(layers)) or not set(layers) <= set(stages):
        raise BadValueError(f"returned_layers={returned_layers} for {backbone_name}: give increasing stage "
                            f"numbers from {stages}")
    if resnet:
        return_layers = {f"layer{k}": str(v) for v, k in enumerate(layers)}
        in_channels = [body.inplanes // 8 * 2 ** (k - 1) for k in layers]
    else:
        return_layers = {str(starts[k]): str(v) for v, k in enumerate(layers)}
        in_channels = [body[starts[k]].out_channels for k in layers]
    return BackboneWithFPN(body, return_layers, in_channels, channels, extra_blocks=extra_blocks)


def backbone_body(model: nn.Module) -> nn.Module:
    """The detector's feature extractor without FPN: torchvision's ``IntermediateLayerGetter`` over a ResNet
    (children ``conv1, bn1, relu, maxpool, layer1..layer4``, the ResNet's own key names, no ``fc``) or over
    MobileNetV3's ``features`` (children ``"0".."16"``, i.e. ``features.<i>`` keys without the prefix)."""
    return model.backbone.body


def freeze_backbone_layers(body: nn.Module, trainable_layers: int) -> None:
    """Make only the last ``trainable_layers`` stages of a backbone body trainable, with torchvision's rule.

    ResNet body (or a torchvision ResNet): stages ``layer4, layer3, layer2, layer1, conv1`` counted from the
    top, ``bn1`` trainable only with all 5 (a ResNet's ``fc`` is not a stage and gets frozen). MobileNetV3
    body: stage starts are block 0, the strided blocks and the last block; 0..6 stages. Sets
    ``requires_grad`` both ways, so calling it again with another value re-freezes or unfreezes.
    """
    resnet = hasattr(body, "layer4")
    starts = [] if resnet else mobilenet_stages(body)
    limit = 5 if resnet else len(starts)
    if isinstance(trainable_layers, bool) or not 0 <= trainable_layers <= limit:
        raise BadValueError(f"trainable_backbone_layers must be in [0, {limit}], got {trainable_layers}")
    if resnet:
        stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            stages.append("bn1")
    else:
        first = len(list(body.children())) if trainable_layers == 0 else starts[limit - trainable_layers]
        stages = [name for i, (name, _) in enumerate(body.named_children()) if i >= first]
    for name, p in body.named_parameters():
        p.requires_grad_(any(name == s or name.startswith(s + ".") for s in stages))


def freeze_batchnorm(module: nn.Module) -> None:
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
            freeze_batchnorm(child)


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def use_channels_last(model: nn.Module) -> nn.Module:
    """Store the detector's 4-D weights, and feed its backbone, in NHWC (``torch.channels_last``) layout.

    Same numbers, other memory order: oneDNN convolutions on CPUs and tensor-core convolutions on GPUs run
    faster on NHWC, above all the depthwise convolutions of MobileNetV3 (the demo's MobileNetV3-FPN detectors
    train 1.1-1.3x faster per step on 2 CPU cores: docs/benchmarks.md, 'Detector training speed'). The
    batched input torchvision's transform builds is NCHW, hence the hook on the backbone; every later
    activation inherits the layout from its convolution. Returns ``model`` (converted in place).
    """
    model.to(memory_format=torch.channels_last)
    model.backbone.register_forward_pre_hook(_channels_last_input)  # a module-level function pickles (DDP spawn)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` number of parameter elements."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
