"""What both module families need to stay correct under DDP (several processes, one model each)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


def skipped_batch_loss(module: L.LightningModule) -> Tensor | None:
    """What ``training_step`` returns for a batch whose samples were all skipped as unreadable.

    One process: ``None``, and Lightning skips to the next batch. Lightning does not support ``None`` with
    several processes: DDP all-reduces gradients inside ``backward``, so a process that skipped it would
    leave the others waiting forever. There, the loss is a zero that touches every trainable parameter,
    so this process joins the all-reduce with zero gradients: the step averages the other processes'
    gradients with zeros (this batch's share of the step is lost, not replaced).
    """
    if module.trainer.world_size <= 1:
        return None
    zero = torch.zeros((), device=module.device)
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), zero)
