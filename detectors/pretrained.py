"""Pretrained weights for the detectors: torchvision's weights enums, their files, and local state-dict files.

Weights follow torchvision's meaning: ``weights`` names a COCO detector weights enum member ("DEFAULT",
"COCO_V1"), ``weights_backbone`` an ImageNet one ("DEFAULT", "IMAGENET1K_V1"). Files come through
``Weights.get_state_dict`` -> ``torch.hub.load_state_dict_from_url``, which reads
``<torch.hub.get_dir()>/checkpoints/<file name of the URL>`` (``$TORCH_HOME/hub/checkpoints``) before trying
the network, so placing the file there works offline. Every file is unpickled with ``weights_only=True``
(torchvision's builders use ``weights_only=False``), and a file that does not fit the model is refused with
its name and the first offending keys.

A ``weights_path`` file holds a whole detector: a ``torch.save(model.state_dict())`` file, or a Lightning
checkpoint whose ``state_dict`` holds the detector under a ``model.`` prefix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model_weights

from training.errors import BadValueError, MissingFileError

from .variants import VARIANTS, Variant

_FASTER_RCNN_CLS_KEY = "roi_heads.box_predictor.cls_score.weight"
_RETINANET_CLS_KEY = "head.classification_head.cls_logits.weight"
_RETINANET_REG_KEY = "head.regression_head.bbox_reg.weight"


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` looks for ``weights`` before downloading."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def resolve_weights(enum_cls: type[WeightsEnum], value: str | WeightsEnum, what: str) -> WeightsEnum:
    """The member of ``enum_cls`` that ``value`` ("DEFAULT", "COCO_V1", ...) names; ``what`` names the
    argument in the error."""
    try:
        return enum_cls.verify(value)
    except (KeyError, TypeError) as e:
        raise BadValueError(f"{what}={value!r} is not one of {enum_cls.__name__}'s weights: "
                            f"{', '.join(enum_cls.__members__)}") from e


def fetch_state_dict(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's own mechanism (hub cache first, then download), but unpickling with weights_only=True."""
    path = cached_weights_path(weights)
    was_cached = path.is_file()
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- only a download and a torch.load happen in there
        if was_cached:
            raise RuntimeError(f"cannot read the cached weights file {path} ({weights}): {type(e).__name__}: {e}. "
                               "Delete it to download again, or pass weights_path=<a local .pth>.") from e
        raise MissingFileError(
            f"{weights} is not in the torch hub cache and could not be downloaded ({type(e).__name__}: {e}). "
            f"Offline, download {weights.url} elsewhere and place it at {path} "
            f"(torch.hub.get_dir() follows $TORCH_HOME), or pass weights_path=<a local .pth state dict>."
        ) from e


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A full-detector state dict from ``path``: a ``torch.save(model.state_dict())`` file, or a Lightning
    checkpoint whose ``state_dict`` holds the detector under a ``model.`` prefix. Read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights_path {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same clear message
        raise BadValueError(f"weights_path {path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadValueError(f"weights_path {path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    if not any(k.startswith("backbone.") for k in obj) and any(k.startswith("model.") for k in obj):
        obj = {k.removeprefix("model."): v for k, v in obj.items() if k.startswith("model.")}
    return obj


def classes_in_state_dict(state: dict[str, torch.Tensor], arch: str, path: str | os.PathLike) -> int:
    """The number of classes (background included) of the ``arch`` detector whose weights ``state`` holds."""
    key = _FASTER_RCNN_CLS_KEY if arch == "fasterrcnn" else _RETINANET_CLS_KEY
    if key not in state or (arch == "retinanet" and _RETINANET_REG_KEY not in state):
        raise BadValueError(f"weights_path {path}: not a {arch} state dict (no key {key!r}); "
                            f"its first keys: {list(state)[:5]}")
    if arch == "fasterrcnn":
        return state[key].shape[0]
    anchors = state[_RETINANET_REG_KEY].shape[0] // 4  # bbox_reg has 4 outputs per anchor
    return state[key].shape[0] // anchors


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)``, refusing a file that does not fit with its name (``source``) and the
    first few missing, unexpected and mis-shaped keys (torch's own message lists every key)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        own = model.state_dict()
        skip = ("num_batches_tracked",)  # BatchNorm <-> FrozenBatchNorm2d files differ only in these
        missing = [k for k in own if k not in state and not k.endswith(skip)]
        unexpected = [k for k in state if k not in own and not k.endswith(skip)]
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
        raise BadValueError(f"{source} does not fit this model: missing keys {missing[:5]} ({len(missing)}), "
                            f"unexpected keys {unexpected[:5]} ({len(unexpected)}), shape mismatches {shapes[:5]} "
                            f"({len(shapes)})") from e


def load_imagenet_body(body: nn.Module, weights: WeightsEnum) -> None:
    """Load torchvision's ImageNet classifier file ``weights`` into a detector's body. The file holds the whole
    classifier: the body has the ResNet's keys without ``fc``, or MobileNetV3's ``features.*`` keys without the
    prefix."""
    state = fetch_state_dict(weights)
    if hasattr(body, "layer4"):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    else:
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    load_checked(body, state, f"{weights} ({cached_weights_path(weights)})")


@dataclass(frozen=True)
class Pretrained:
    """The weights a detector starts from, resolved and checked: COCO weights of the whole detector, a local
    whole-detector file (read: its class count decides the structure), or ImageNet weights of the body."""

    detector: WeightsEnum | None = None
    backbone: WeightsEnum | None = None
    path: str | None = None
    state: dict[str, torch.Tensor] | None = None  # the file at ``path``

    @property
    def given(self) -> bool:
        return self.detector is not None or self.backbone is not None or self.state is not None

    def num_classes(self, arch: str, wanted: int) -> int:
        """The class count the weights were trained with (``wanted`` for an ImageNet body or none)."""
        if self.state is not None:
            return classes_in_state_dict(self.state, arch, self.path)
        if self.detector is not None:
            return len(self.detector.meta["categories"])
        return wanted

    def load_into(self, model: nn.Module) -> None:
        if self.backbone is not None:
            load_imagenet_body(model.backbone.body, self.backbone)
        if self.detector is not None:
            source = f"{self.detector} ({cached_weights_path(self.detector)})"
            load_checked(model, fetch_state_dict(self.detector), source)
        elif self.state is not None:
            load_checked(model, self.state, f"weights_path {self.path}")


def resolve_pretrained(variant: Variant, weights: str | None, weights_backbone: str | None,
                       weights_path: str | None) -> Pretrained:
    """As torchvision: ``weights_backbone`` is ignored when ``weights`` is given (the detector file holds the
    backbone too). ``weights_path`` excludes both."""
    if weights_path is not None:
        if weights is not None or weights_backbone is not None:
            raise BadValueError("weights_path loads a whole detector: give it alone, without weights/weights_backbone")
        return Pretrained(path=weights_path, state=load_state_dict_file(weights_path))
    if weights is not None:
        if variant.custom:
            pretrained = [n for n, v in VARIANTS.items() if not v.custom]
            raise BadValueError(f"torchvision has no COCO weights for {variant.name} (it has them for "
                                f"{', '.join(pretrained)}); use weights_backbone or weights_path")
        return Pretrained(detector=resolve_weights(get_model_weights(variant.name), weights, "weights"))
    if weights_backbone is not None:
        enum = get_model_weights(variant.backbone_fn)
        return Pretrained(backbone=resolve_weights(enum, weights_backbone, "weights_backbone"))
    return Pretrained()
