"""What both module families need to stay correct under DDP (several processes, one model each)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn


def skipped_batch_loss(module: L.LightningModule) -> Tensor | None:
    """What ``training_step`` returns for a batch whose samples were all skipped as unreadable.

    One process: ``None``, and Lightning skips the optimiser step. With several processes Lightning refuses
    ``None`` (it raises on that process, and the others, waiting in DDP's gradient all-reduce inside
    ``backward``, hang until killed). There, the loss is a zero that touches every trainable parameter, so
    this process joins the all-reduce with zero gradients: the step averages the other processes' gradients
    with zeros (this batch's share is lost, not replaced). If every process skips the same step, the
    optimiser still steps on all-zero gradients (momentum and weight decay move the weights; the step
    counter and per-step schedulers advance).
    """
    if not distributed(module):
        return None
    zero = torch.zeros((), device=module.device)
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), zero)


def distributed(module: L.LightningModule) -> bool:
    """Whether the module runs in a Trainer with several processes, where every process must enter the same
    collective operations (gradient all-reduce, metric syncs) in the same order."""
    trainer = getattr(module, "_trainer", None)  # None when called outside a Trainer
    return trainer is not None and trainer.world_size > 1


def any_process(module: L.LightningModule, flag: bool) -> bool:
    """``flag`` of this process, or-ed over all processes under DDP (every process must call it): for decisions
    that must be the same everywhere, like stopping on an error that only one process saw."""
    return module.trainer.strategy.reduce_boolean_decision(flag, all=False) if distributed(module) else flag


def refuse_skip_with_sync_batchnorm(module: L.LightningModule) -> None:
    """Raise (on every process alike, at fit start) for ``on_bad_sample: skip`` data with synchronised
    BatchNorm under DDP: a process whose whole batch was skipped runs no forward pass, and the others would
    wait forever in SyncBatchNorm's collectives."""
    if not distributed(module):
        return
    hparams = getattr(getattr(module.trainer, "datamodule", None), "hparams", None) or {}
    if hparams.get("on_bad_sample") == "skip" and any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        raise ValueError("on_bad_sample='skip' cannot be combined with trainer.sync_batchnorm=True under DDP (a "
                         "process with nothing to train on would leave the others waiting in the synchronised "
                         "BatchNorm): fix or remove the unreadable files, or train without sync_batchnorm")
