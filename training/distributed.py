"""What both module families need to stay correct under DDP (several processes, one model each).

Every process must enter the same collective operations (gradient all-reduce, epoch-end metric and loss
syncs, agreed decisions) in the same order, or the others wait in them forever (with NCCL, until its timeout).
:class:`DistributedSteps` keeps that true where one process differs from the others: a batch whose samples
were all skipped as unreadable (``on_bad_sample: skip``), an epoch in which it scored nothing, an error that
only it saw. The detector and classifier modules both derive from it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sized

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import Sampler, SequentialSampler
from torchmetrics import Metric

from training.errors import BadValueError


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
        raise BadValueError("on_bad_sample='skip' cannot be combined with trainer.sync_batchnorm=True under DDP (a "
                         "process with nothing to train on would leave the others waiting in the synchronised "
                         "BatchNorm): fix or remove the unreadable files, or train without sync_batchnorm")


def evaluation_sampler(datamodule: L.LightningDataModule, dataset: Sized) -> Sampler:
    """The sampler of a validation or test loader: every image scored exactly once, however many processes.

    Lightning gives an evaluation loader under DDP a ``DistributedSampler``, which pads the data set with
    repeats to a multiple of the process count: 5 images on 2 GPUs are scored as 6, so mAP and accuracy
    are no longer pycocotools' numbers for the split, and two runs on different GPU counts disagree.
    Lightning's ``UnrepeatedDistributedSampler`` (what it uses for ``predict``) splits without repeats; the
    processes then run batch counts one apart, which evaluation allows (DDP syncs buffers only on the first
    forward pass without gradients, and the epoch-end metric gathers take lists of any length). Lightning keeps
    a ``DistributedSampler`` it is given. With ``use_distributed_sampler=False`` (each process reads what its
    loader gives it) or fewer items than processes (one would get none), the plain sequential sampler.
    """
    trainer = datamodule.trainer  # None outside a Trainer
    # Lightning's Trainer(use_distributed_sampler=...) flag is kept only on its private connector.
    wanted = trainer is not None and getattr(trainer._accelerator_connector, "use_distributed_sampler", True)
    if wanted and trainer.world_size > 1 and len(dataset) >= trainer.world_size:
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                            shuffle=False)  # fmt: skip
    return SequentialSampler(dataset)


def gather_to_first(obj: object, group: object | None = None) -> list | None:
    """``obj`` of every process of ``group`` (default: all), on the group's first process as a list in rank
    order; ``None`` on the others. Every process of the group must call it. ``obj`` is pickled: tensors go
    as CPU tensors (a CUDA tensor would be unpickled on its sender's device), and are unpickled with
    ``weights_only=True`` (tensors, containers and plain values only)."""
    size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    gathered = [None] * size if rank == 0 else None
    torch.distributed.gather_object(obj, gathered, group=group, group_dst=0, weights_only=True)
    return gathered


def computed_once(fn: Callable[[], object], group: object | None = None) -> object:
    """``fn()`` run on the first process of ``group`` only, its result (plain values: weights_only
    unpickling) sent to every process: an expensive epoch-end computation done once instead of once per
    process, every process returning the same value. An error in ``fn`` is raised on every process (as a
    ``RuntimeError`` naming it on the others), so none is left waiting. Every process of the group must
    call it."""
    box: list = [None]
    if torch.distributed.get_rank(group) == 0:
        try:
            box = [("ok", fn())]
        except Exception as error:
            torch.distributed.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], group=group,
                                                    group_src=0, weights_only=True)  # fmt: skip
            raise
    torch.distributed.broadcast_object_list(box, group=group, group_src=0, weights_only=True)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"the first process failed in the epoch-end computation: {value}")
    return value


class EpochMean(Metric):
    """The epoch's per-sample mean of a per-batch mean (a loss), each batch weighted by its size: the mean over
    the epoch's samples, on one process or gathered from several.

    Why not Lightning's ``self.log(name, loss, batch_size=n, sync_dist=True)``: Lightning 2.6 mean-reduces the
    processes' integer sums of batch sizes, which floors whenever the total is not a multiple of the process
    count (Lightning-AI/pytorch-lightning#21859): 5 validation images on 2 processes gave a val_loss 25% too
    high, and ModelCheckpoint/ReduceLROnPlateau decide on that value. Why not torchmetrics' ``MeanMetric``: it
    ignores the weights under ``nan_strategy="disable"``, and otherwise checks every update for NaN, one
    GPU-to-host wait per step. Here both sums are float states that torchmetrics sums across processes.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: int) -> None:
        """``value``: the batch's mean; ``weight``: its number of samples (0: a process that took part with
        nothing, e.g. every sample unreadable)."""
        self.total += value.detach().float() * weight
        self.count += weight

    def compute(self) -> Tensor:
        return self.total / self.count  # NaN when no process had a sample


def epoch_means(names: list[str]) -> nn.ModuleDict:
    """One :class:`EpochMean` per logged name, built with the module (Lightning finds logged metrics among the
    module's children, so they cannot be added later)."""
    return nn.ModuleDict({name: EpochMean() for name in names})


def log_epoch_means(module: L.LightningModule, means: nn.ModuleDict, values: dict[str, Tensor], n: int,
                    **log_options) -> None:  # fmt: skip
    """Add a batch of ``n`` samples to each name's epoch mean and log it; Lightning computes (gathering across
    processes) and resets it at the epoch's end. Under DDP every process must log every name, even with n=0."""
    for name, value in values.items():
        means[name].update(value, n)
        module.log(name, means[name], on_step=False, on_epoch=True, **log_options)


def log_gathered(module: L.LightningModule, values: dict[str, Tensor | float], **log_options) -> None:
    """Log epoch-level values that every process already holds alike: computed from states gathered across
    processes (a metric's ``compute()``).

    Logged with ``sync_dist=False``, Lightning would warn under DDP, once per name, that the value is not
    accumulated across processes. ``sync_dist=True`` with ``reduce_fx="max"``: the all-reduce of equal values
    returns the value itself, bit for bit (a mean would divide a rounded sum by the process count), and on one
    process it is no operation. One small collective per name and epoch."""
    for name, value in values.items():
        module.log(name, value, sync_dist=True, reduce_fx="max", **log_options)


class DistributedSteps:
    """Mixin for LightningModules: the steps and epoch ends that one process runs differently from the others,
    kept in step with them under DDP. Set ``self.loss_means = epoch_means(names)`` in ``__init__``; on one
    process every method reduces to the plain single-process behaviour."""

    loss_means: nn.ModuleDict

    def on_fit_start(self) -> None:
        refuse_skip_with_sync_batchnorm(self)
        super().on_fit_start()

    def log_gathered(self, values: dict[str, Tensor | float], **log_options) -> None:
        """:func:`log_gathered`."""
        log_gathered(self, values, **log_options)

    def log_epoch_means(self, values: dict[str, Tensor], n: int, **log_options) -> None:
        """:func:`log_epoch_means` into ``self.loss_means``."""
        log_epoch_means(self, self.loss_means, values, n, **log_options)

    def skip_empty_batch(self, names: list[str], *, training: bool, prog_bar: Collection[str] = (),
                         metrics: dict[str, Metric] | None = None, stop_together: bool = False) -> Tensor | None:
        """The step of a batch whose samples were all skipped as unreadable; returns what the step returns.

        One process: nothing to do, ``None`` (a training step's ``None`` skips the optimiser step). Under DDP
        this process joins what the others' steps enter: with ``stop_together``, the error check of
        :meth:`stop_together`; the epoch means of ``names`` with weight 0 (``prog_bar``: those the others
        show there) and the epoch-logged ``metrics`` with batch size 0, so the epoch-end syncs pair up; in
        training, the gradient all-reduce (:func:`skipped_batch_loss`).
        """
        if not distributed(self):
            return None
        if stop_together:
            self.stop_together(None)
        zero = torch.zeros((), device=self.device)
        for name in names:
            self.log_epoch_means({name: zero}, 0, prog_bar=name in prog_bar)
        for name, metric in (metrics or {}).items():
            self.log(name, metric, on_step=False, on_epoch=True, batch_size=0)
        return skipped_batch_loss(self) if training else None

    def stop_together(self, error: Exception | None) -> None:
        """Raise ``error``, and under DDP stop every process when any has one: a process raising alone leaves
        the others waiting in the gradient all-reduce. Every process must call it at the same point."""
        if any_process(self, error is not None):
            raise error or RuntimeError(f"stopped at step {self.global_step}: another process failed (its error "
                                        "is in its log)")

    def computes_epoch_metric(self, metric: Metric, scored: bool,
                              join_empty: Callable[[], None] | None = None) -> bool:
        """Whether to compute ``metric`` at the epoch's end: its ``compute()`` gathers across processes, so all
        compute, or none (no process ``scored`` anything: a sanity check with zero batches, or every batch
        skipped as unreadable). Under DDP a process whose ``metric`` had no update first calls ``join_empty``
        to give it typed empty states (torchmetrics' own stand-ins can have the wrong dtype and rank)."""
        if join_empty is not None and distributed(self) and metric.update_count == 0:
            join_empty()
        return any_process(self, scored)
