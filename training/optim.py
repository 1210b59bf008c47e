"""The optimisers every litvision model offers (``optimizer: sgd | adamw``), built in one place."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from training.errors import BadValueError

# Devices with PyTorch's fused SGD/AdamW kernels (CPU since torch 2.4; older versions refuse or lack the
# argument, and the loop implementation is used).
_FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(
    name: Literal["sgd", "adamw"],
    params: Iterable,
    lr: float,
    momentum: float,
    weight_decay: float,
    precision: str | int | None = None,
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over ``params`` (tensors or parameter groups), with PyTorch's fused kernel
    where it can be used.

    Why fused: the default implementation loops over the parameter tensors (~200 in the demo models) with a
    dozen small operations each, 18-21 ms per AdamW step on 2 CPU cores against 5-8 ms fused
    (docs/benchmarks.md, "Detector training speed"); on GPUs the fused kernel is the faster one too. Not under mixed precision
    (``precision``, the Trainer's setting, "16-mixed" or "bf16-mixed"): Lightning's mixed-precision plugin
    refuses gradient clipping with an optimiser that unscales gradients inside its step, as fused ones do."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    options = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        cls, options["momentum"] = torch.optim.SGD, momentum
    elif name == "adamw":
        cls = torch.optim.AdamW
    else:
        raise BadValueError(f"optimizer={name!r}: choose 'sgd' or 'adamw'")
    mixed = str(precision).endswith("mixed") or str(precision) in ("16", "bf16")
    fused = not mixed and all(p.device.type in _FUSED_DEVICES for p in tensors)
    if fused:
        try:
            return cls(params, fused=True, **options)
        except (RuntimeError, TypeError):  # a torch without fused kernels for this device, or at all
            pass
    return cls(params, **options)
