"""The optimisers every litvision model offers (``optimizer: sgd | adamw``) and the detectors' LR schedules
(warm-up, milestones, cosine decay), built in one place."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

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


def lr_schedulers(opt: torch.optim.Optimizer, warmup_iters: int, warmup_factor: float, lr_milestones: list[int] | None,
                  lr_gamma: float, cosine_decay: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Lightning scheduler configs: a linear warm-up from ``lr * warmup_factor`` over ``warmup_iters`` steps, LR
    multiplied by ``lr_gamma`` at the epoch ``lr_milestones``, a cosine from 1 to 0 over the run. The cosine's
    length is set by :func:`set_cosine_length` once the Trainer knows the run's (a resumed run must not ask
    for it earlier: ``DetectionModule.on_train_start`` says why).

    Chainable schedulers multiply the current LR, so reductions made by the Keras-style ReduceLROnPlateau
    callback compose with them instead of being overwritten.
    """
    schedulers = []
    if warmup_iters > 0 and warmup_factor < 1:
        warmup = torch.optim.lr_scheduler.LinearLR(opt, warmup_factor, 1.0, total_iters=warmup_iters)
        schedulers.append({"scheduler": warmup, "interval": "step"})
    if lr_milestones:
        steps = torch.optim.lr_scheduler.MultiStepLR(opt, lr_milestones, lr_gamma)
        schedulers.append({"scheduler": steps, "interval": "epoch"})
    if cosine_decay:
        # The closed form is never used: stepping applies the recursive (multiplicative) form, so the
        # warm-up and plateau factors carry through. eta_min=0 keeps it purely multiplicative. T_max is a
        # stand-in until set_cosine_length: the constructor's step does not read it.
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1, eta_min=0.0)
        schedulers.append({"scheduler": cosine, "interval": "step"})
    # One name for all of them: LearningRateMonitor would log the same LR once per scheduler, as
    # "lr-AdamW", "lr-AdamW-1", ..., which reads as several optimisers.
    for config in schedulers:
        config["name"] = f"lr-{type(opt).__name__}"
    return schedulers


def set_cosine_length(schedulers: list[Any], total: float) -> None:
    """Make every CosineAnnealingLR of ``schedulers`` span ``total`` optimiser steps (the run's); refuse an
    unbounded run."""
    if not 0 < total < float("inf"):
        raise BadValueError("cosine_decay needs a finite run length: set trainer.max_epochs or max_steps "
                            f"(estimated optimiser steps: {total})")
    for scheduler in schedulers:
        if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            scheduler.T_max = int(total)
