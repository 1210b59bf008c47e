"""Which layout a detector's backbone body gets, with which FrozenBatchNorm2d eps, and what ``load_model`` must
pass to rebuild it offline: the one place that decides all three.

Two layouts, torchvision's:

* from scratch: BatchNorm2d everywhere and every layer trainable (``trainable_backbone_layers`` has no effect;
  torchvision warns when it is given);
* pretrained: the body's BatchNorm2d become FrozenBatchNorm2d (not in the ``_v2`` variants, which keep
  BatchNorm) and all but the top ``trainable_backbone_layers`` stages (default 3) are frozen.

A body gets the pretrained layout when its weights are pretrained:

* torchvision's ``weights`` or ``weights_backbone``, or a whole-detector ``weights_path`` file;
* a ``backbone_checkpoint`` (a litvision classifier's or detector's body) *with* ``trainable_backbone_layers``:
  such a body is just as pretrained, but torchvision's rule only knows its own weights, so the setting says
  it. Without it every layer of the body trains (``backbone_lr_scale`` slows it). The layout follows the
  settings alone, not whether the file exists yet: a run resumed from its config rebuilds what it saved;
* ``pretrained_layout=True``: ``load_model`` rebuilding a saved pretrained model without its weights.

The eps of the FrozenBatchNorm2d layers: frozen statistics only mean what they meant in training under the
same eps. torchvision loads its legacy ``fasterrcnn_resnet50_fpn``/``retinanet_resnet50_fpn`` COCO_V1 files
with eps=0 (also given to a ``weights_path`` file of the same name); statistics copied from a checkpoint keep
the eps of the checkpoint's norm layers (MobileNetV3's BatchNorm: 1e-3; frozen with FrozenBatchNorm2d's
default 1e-5 its low-variance channels are scaled several times too much and a detector on that body
collapses). A state dict holds no eps, so the copied one is recorded in the hyperparameters as
``frozen_bn_eps``; an explicit ``frozen_bn_eps`` wins.

Offline rebuilding (``DetectionModule.offline_hparams``): the weight arguments become None (the saved state
dict replaces the weights), ``pretrained_layout=True`` wherever they gave the pretrained layout, and
``frozen_bn_eps`` the eps they implied, so the rebuilt model has exactly the saved state dict's structure.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models import WeightsEnum, get_model_weights
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _validate_trainable_layers
from torchvision.ops.misc import FrozenBatchNorm2d

from training.errors import BadValueError
from training.saving import copy_backbone, default_offline_hparams

from .backbones import backbone_body, freeze_backbone_layers, freeze_batchnorm
from .pretrained import Pretrained, resolve_weights
from .variants import Variant, find_variant

DEFAULT_TRAINABLE_LAYERS = 3


def apply_pretrained_layout(model: nn.Module, variant: Variant, pretrained: bool, trainable_layers: int | None) -> None:
    """Give ``model``'s body the pretrained layout when ``pretrained``; without it, only torchvision's warning
    for a ``trainable_layers`` that has no effect."""
    layers = _validate_trainable_layers(pretrained, trainable_layers, variant.max_trainable_layers,
                                        DEFAULT_TRAINABLE_LAYERS)  # fmt: skip
    if pretrained:
        body = backbone_body(model)
        if variant.frozen_bn:
            freeze_batchnorm(body)
        freeze_backbone_layers(body, layers)


def set_frozen_bn_eps(model: nn.Module, variant: Variant, pretrained: Pretrained, eps: float | None) -> None:
    """Give ``model``'s FrozenBatchNorm2d layers their eps: ``eps`` when given; 0 for whole-detector weights
    that torchvision loads with eps=0; else FrozenBatchNorm2d's default stays."""
    if eps is None and _legacy_eps0(variant, pretrained.detector, pretrained.path):
        eps = 0.0
    if eps is not None:
        overwrite_eps(model, eps)


def _legacy_eps0(variant: Variant, detector: WeightsEnum | None, path: str | None) -> bool:
    eps0 = variant.eps0_weights
    if eps0 is None:
        return False
    return detector == eps0 or (path is not None and Path(path).name == Path(eps0.url).name)


def frozen_bn_eps_of(arch: str, backbone: str, weights: str | None, weights_path: str | None) -> float | None:
    """0.0 when these weights are one of torchvision's legacy files it loads with FrozenBatchNorm eps=0."""
    variant = find_variant(arch, backbone)
    detector = None
    if weights is not None and not variant.custom:
        detector = resolve_weights(get_model_weights(variant.name), weights, "weights")
    return 0.0 if _legacy_eps0(variant, detector, weights_path) else None


def take_frozen_bn_eps(body: nn.Module, donor: nn.Module) -> float | None:
    """Give every FrozenBatchNorm2d of ``body`` the eps of the norm layer of the same name in ``donor``, the
    model its statistics were copied from; returns that eps (None: no FrozenBatchNorm2d)."""
    donors = dict(donor.named_modules())
    found = set()
    for name, module in body.named_modules():
        eps = getattr(donors.get(name), "eps", None)
        if isinstance(module, FrozenBatchNorm2d) and eps is not None:
            module.eps = float(eps)
            found.add(float(eps))
    if len(found) > 1:
        raise BadValueError(f"the donor body's norm layers use several eps ({sorted(found)}); a frozen copy of "
                            "it could not be rebuilt from one frozen_bn_eps")
    return found.pop() if found else None


def _has_torchvision_weights(hparams: dict[str, Any]) -> bool:
    return any(hparams.get(k) is not None for k in ("weights", "weights_backbone", "weights_path"))


def _freezes_checkpoint_body(hparams: dict[str, Any]) -> bool:
    return (hparams.get("backbone_checkpoint") is not None and hparams.get("trainable_backbone_layers") is not None
            and not _has_torchvision_weights(hparams))


def pretrained_layout(hparams: dict[str, Any]) -> bool:
    """``build_detector``'s ``pretrained_layout`` for a detector module's ``hparams``: asked for, or given to a
    ``backbone_checkpoint`` body (torchvision's weights imply it in ``build_detector`` itself)."""
    return bool(hparams.get("pretrained_layout")) or _freezes_checkpoint_body(hparams)


def copy_checkpoint_body(model: nn.Module, hparams: dict[str, Any]) -> float | None:
    """Copy the body of ``hparams["backbone_checkpoint"]`` into ``model``'s (``if_checkpoint_missing``:
    "raise" or "warn" when the file does not exist). Returns the eps to record as ``frozen_bn_eps``: the
    donor's, when it froze statistics and no ``frozen_bn_eps`` was given; else None."""
    path, if_missing = hparams["backbone_checkpoint"], hparams["if_checkpoint_missing"]
    if _freezes_checkpoint_body(hparams) and not os.path.isfile(path) and if_missing == "warn":
        warnings.warn(f"trainable_backbone_layers={hparams['trainable_backbone_layers']} with a missing "
                      "backbone_checkpoint: the body's lower stages stay frozen at their random initial weights "
                      "and its FrozenBatchNorm2d layers normalise nothing; run the pretraining first, or set "
                      "trainable_backbone_layers to null to train every layer", stacklevel=3)
    donor = copy_backbone(path, backbone_body(model), hparams["backbone"], if_missing)
    if donor is None or hparams.get("frozen_bn_eps") is not None:
        return None
    return take_frozen_bn_eps(backbone_body(model), donor)


def offline_hparams(arch: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` that rebuild the saved detector without fetching weights, but with the layout they imply
    (FrozenBatchNorm2d, frozen stages, legacy eps), so the saved state dict fits exactly."""
    hp = dict(hparams)
    if _has_torchvision_weights(hp):
        hp["pretrained_layout"] = True
        if hp.get("frozen_bn_eps") is None:
            hp["frozen_bn_eps"] = frozen_bn_eps_of(arch, hp["backbone"], hp.get("weights"), hp.get("weights_path"))
    elif _freezes_checkpoint_body(hp):
        hp["pretrained_layout"] = True  # its eps is recorded in frozen_bn_eps already
    return default_offline_hparams(hp)
