"""torchvision classification networks without their classifier, and Keras-style layer freezing.

Each backbone maps ``[B, 3, H, W]`` to a feature map ``[B, C, h, w]``; its module names
are torchvision's (``conv1``, ``layer1.0.conv1`` for ResNet; ``0.0``, ``1.block...`` for
the ``features`` of MobileNet/EfficientNet/ConvNeXt), which are also the names of a
torchvision detector's ``backbone.body`` -- so a detector's body loads straight in.

Layers, as Keras numbers them: the backbone's *leaf* modules in definition order
(``named_modules()`` order, convolutions, norms, activations and pools alike), plus any
container owning parameters of its own.
``python train.py layers --backbone resnet50`` prints the list with indices.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum, get_model_weights

from training.errors import BadValueError, MissingFileError

# name -> (torchvision builder name, feature channels, whether the body is `.features`)
BACKBONES: dict[str, tuple[str, int, bool]] = {
    "resnet18": ("resnet18", 512, False),
    "resnet34": ("resnet34", 512, False),
    "resnet50": ("resnet50", 2048, False),
    "mobilenet_v3_small": ("mobilenet_v3_small", 576, True),
    "mobilenet_v3_large": ("mobilenet_v3_large", 960, True),
    "efficientnet_b0": ("efficientnet_b0", 1280, True),
    "convnext_tiny": ("convnext_tiny", 768, True),
}
# Keys of the torchvision classifier, dropped when loading a classification state dict (timm-style).
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "avgpool.")


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise BadValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def weights_enum(name: str) -> type[WeightsEnum]:
    _check_name(name)
    return get_model_weights(BACKBONES[name][0])


def resolve_weights(name: str, weights: str) -> WeightsEnum:
    enum = weights_enum(name)
    try:
        return enum.verify(weights)
    except (KeyError, TypeError, ValueError):
        raise BadValueError(f"weights={weights!r} is not one of {enum.__name__}: {', '.join(enum.__members__)}") from None


def fetch_weights(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's loader (hub cache first, then the network) with ``weights_only=True``; offline, a clear error."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a download or torch.load failed; say how to fix it
        raise MissingFileError(
            f"{weights} could not be loaded ({type(e).__name__}: {e}). Offline, download {weights.url} "
            f"elsewhere and place it at {path} (torch.hub.get_dir() follows $TORCH_HOME), or pass "
            "weights_path=<a local .pth state dict>."
        ) from e


def _full_model(name: str) -> nn.Module:
    return torchvision.models.get_model(BACKBONES[name][0], weights=None)


def _body_of(model: nn.Module, name: str) -> nn.Module:
    if BACKBONES[name][2]:
        return model.features
    return nn.Sequential(OrderedDict((n, m) for n, m in model.named_children() if n not in ("avgpool", "fc")))


def load_classification_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a torchvision classification state dict, ignoring its classifier (a new head replaces it)."""
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
    if missing or result.unexpected_keys:
        raise BadValueError(
            f"{source}: does not fit the backbone: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def build_backbone(
    name: str, weights: str | None = None, weights_path: str | None = None
) -> tuple[nn.Module, int, WeightsEnum | None]:
    """``(body, feature_channels, weights_enum_or_None)`` for a torchvision classification network."""
    _check_name(name)
    if weights is not None and weights_path is not None:
        raise BadValueError("give weights or weights_path, not both")
    model = _full_model(name)
    enum = None
    if weights is not None:
        enum = resolve_weights(name, weights)
        load_classification_state(model, fetch_weights(enum), str(enum))
    elif weights_path is not None:
        if not os.path.isfile(weights_path):
            raise MissingFileError(f"weights_path {weights_path}: no such file")
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise BadValueError(f"weights_path {weights_path}: not a readable state dict ({type(e).__name__}: {e})") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BadValueError(f"weights_path {weights_path}: expected a dict of tensors")
        load_classification_state(model, state, f"weights_path {weights_path}")
    return _body_of(model, name), BACKBONES[name][1], enum


def leaf_layers(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """The flat, stable layer order used by ``freeze=N``, in definition order: every leaf module, plus the
    few containers that own parameters directly (ConvNeXt's ``layer_scale``). A layer's own parameters
    are ``m.parameters(recurse=False)``, so each parameter belongs to exactly one layer."""
    return [
        (n, m)
        for n, m in body.named_modules()
        if n and (not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False)))
    ]


def select_layers(body: nn.Module, freeze: str | int | list[str] | None) -> list[str]:
    """Names of the leaf layers ``freeze`` designates: "all", the first N, or those under name prefixes."""
    layers = [n for n, _ in leaf_layers(body)]
    if freeze is None or freeze == "none" or freeze == 0:
        return []
    if freeze == "all":
        return layers
    if isinstance(freeze, int) and not isinstance(freeze, bool):
        if not 0 <= freeze <= len(layers):
            raise BadValueError(f"freeze={freeze}: the backbone has {len(layers)} layers (0..{len(layers)})")
        return layers[:freeze]
    if isinstance(freeze, (list, tuple)):
        chosen = [n for n in layers if any(n == p or n.startswith(p.rstrip(".") + ".") for p in freeze)]
        unmatched = [p for p in freeze if not any(n == p or n.startswith(p.rstrip(".") + ".") for n in layers)]
        if unmatched:
            raise BadValueError(f"freeze prefixes {unmatched} match no layer; see `python train.py layers`")
        return chosen
    raise BadValueError(f"freeze must be 'all', 'none', an int or a list of name prefixes, got {freeze!r}")


def describe_layers(body: nn.Module, frozen: set[str] | None = None) -> list[tuple[int, str, str, int, bool]]:
    """``(index, name, type, parameters, frozen)`` for every layer, for ``train.py layers``."""
    frozen = frozen or set()
    return [
        (i, n, type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)), n in frozen)
        for i, (n, m) in enumerate(leaf_layers(body))
    ]


def builder(name: str) -> Callable[..., nn.Module]:
    """The torchvision builder behind a backbone name (for documentation and tests)."""
    _check_name(name)
    return getattr(torchvision.models, BACKBONES[name][0])


def layers_command(backbone: str = "resnet50", freeze: str | int | list[str] | None = None) -> None:
    """Print a classifier backbone's layers with the indices ``freeze=N`` counts (Keras' model.layers).

    Args:
        backbone: resnet18/34/50, mobilenet_v3_small/large, efficientnet_b0, convnext_tiny.
        freeze: optionally mark what a freeze setting would freeze ("all", N, or name prefixes).
    """
    from rich.console import Console
    from rich.table import Table

    body, _, _ = build_backbone(backbone)
    frozen = set(select_layers(body, int(freeze) if isinstance(freeze, str) and freeze.isdigit() else freeze))
    table = Table(title=f"{backbone}: layers in freeze=N order")
    for column in ("index", "name", "type", "params", "frozen"):
        table.add_column(column, justify="right" if column in ("index", "params") else "left")
    rows = describe_layers(body, frozen)
    for index, name, kind, params, is_frozen in rows:
        table.add_row(str(index), name, kind, f"{params:,}", "yes" if is_frozen else "")
    Console().print(table)
    print(f"{len(rows)} layers; freeze=N freezes indices 0..N-1")
