"""Lightning modules for a two-stage (Faster R-CNN) and a one-stage (RetinaNet) detector.

``DetectionModule`` owns everything the two share -- steps, validation loss,
metrics, optimiser, warm-up, logging -- so a comparison between them changes only
the detector. The subclasses only say which torchvision model to build; their
constructor signatures are the configuration (LightningCLI reads the type hints)
and ``save_hyperparameters()`` stores all of it, so ``load_model`` can rebuild
the architecture from a checkpoint.

Batches are ``(images, targets)`` as produced by ``detectors.data``: images
float ``[3, H, W]`` in 0..1 of any size; targets with ``boxes`` XYXY absolute
pixels, ``labels`` 1..K, ``iscrowd``, ``area`` (and ``difficult`` for VOC).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from training.distributed import DistributedSteps, epoch_means
from training.errors import BadValueError
from training.optim import build_optimizer, lr_schedulers, set_cosine_length
from training.saving import SavableModule

from . import layout
from .backbones import backbone_body, count_parameters, use_channels_last
from .evaluation import DetectionEvaluator
from .models import DETECTOR_ARGUMENTS, build_detector
from .val_loss import losses_and_detections, training_losses

Optimizer = Literal["sgd", "adamw"]


def _loss_targets(targets) -> list[dict[str, Tensor]]:
    """What the torchvision model trains on: plain tensors, crowd regions left out (as COCO training does)."""
    out = []
    for t in targets:
        keep = t["iscrowd"] == 0 if "iscrowd" in t else slice(None)
        out.append({"boxes": t["boxes"].as_subclass(Tensor)[keep], "labels": t["labels"][keep]})
    return out


def _count_classes(num_classes: int | None, class_names: list[str] | None) -> int:
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names) + 1:
            raise BadValueError(f"num_classes={num_classes} counts background, so it must be len(class_names) + 1 "
                                f"= {len(class_names) + 1} for class_names={class_names}")
        return len(class_names) + 1
    if num_classes is None:
        raise BadValueError("give num_classes (including background) or class_names")
    return num_classes


def without_background(detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Drop label-0 detections. torchvision counts background in RetinaNet's ``num_classes`` but never trains
    it as a positive class, so early in training its logit can still pass the score threshold."""
    out = []
    for det in detections:
        keep = det["labels"] > 0
        out.append({k: v[keep] for k, v in det.items()})
    return out


def _check_training_options(optimizer: str, backbone_lr_scale: float) -> None:
    if optimizer not in ("sgd", "adamw"):
        raise BadValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if not backbone_lr_scale > 0:
        raise BadValueError(f"backbone_lr_scale must be > 0 (freeze layers with trainable_backbone_layers), "
                            f"got {backbone_lr_scale}")


class DetectionModule(SavableModule, DistributedSteps, L.LightningModule):
    """Shared training/evaluation logic; subclasses implement :meth:`build_model`.

    Args:
        num_classes: classes including background, torchvision's convention (K objects -> K + 1). May be
            omitted when ``class_names`` is given.
        class_names: object class names in label order; used to name per-class metrics.
        backbone: detector variant, see ``detectors.models.list_variants``.
        weights, weights_backbone, weights_path, trainable_backbone_layers: as torchvision defines them
            (see ``detectors.models.build_detector``).
        backbone_checkpoint: a litvision checkpoint whose backbone initialises this detector's backbone
            body: a ``FrozenBackboneClassifier`` trained on the same data (the Keras recipe's transfer
            learning, offline) or another detector. Architectures must match (``resnet18`` <->
            ``resnet18_fpn``). Without ``trainable_backbone_layers`` every layer of such a body trains
            (``backbone_lr_scale`` slows it); with it, the body takes torchvision's pretrained layout, and
            frozen statistics keep the checkpoint's eps (``detectors.layout`` decides both).
        min_size, max_size: resize bounds of the detector's input transform (None: torchvision's default).
        anchor_sizes, aspect_ratios: anchor boxes (None: the variant's default).
        fpn_channels, returned_layers: FPN width and the body stages feeding it (None: torchvision's; see
            ``build_detector``). Small images with small objects want finer maps than torchvision's
            MobileNetV3 default (stride 32 only); CPUs want a narrower FPN.
        score_thresh, nms_thresh, detections_per_img: post-processing of detections.
        optimizer: "sgd" (momentum 0.9 by default) or "adamw".
        lr, momentum, weight_decay: optimiser settings; only trainable parameters are optimised.
        backbone_lr_scale: the backbone body trains at ``lr * backbone_lr_scale`` (its own parameter group,
            named "backbone"; the rest is "heads"). Below 1 a pretrained body keeps more of what it learnt
            (the Keras recipe's "retrain the top layers", softened; 0.3 on the shapes demo, docs/benchmarks.md,
            'The pretrained body: frozen layout, eps and body LR'). 1.0 keeps a single parameter group.
        warmup_iters, warmup_factor: linear warm-up from ``lr * warmup_factor`` over the first iterations.
        lr_milestones, lr_gamma: optional epoch milestones multiplying the LR by ``lr_gamma`` (the
            torchvision reference recipe); leave empty when ReduceLROnPlateau manages the LR.
        cosine_decay: multiply the LR by a cosine from 1 to 0 over the whole run (every optimiser step of
            ``trainer.max_epochs``/``max_steps``, which must be finite). Composes with warm-up and with
            ReduceLROnPlateau's reductions (each step multiplies the current LR).
        compute_val_loss: compute ``val_loss`` (costs the detection heads a second time, not the backbone).
        channels_last: run the detector in NHWC memory layout (same results, faster convolutions on CPUs
            and tensor-core GPUs; see ``detectors.backbones.use_channels_last``).
        pretrained_layout, frozen_bn_eps: the structure of a pretrained model without its weights; set by
            ``load_model`` when it rebuilds a saved model offline (``detectors.layout``).
        **detector_options: the subclass' architecture-specific arguments, passed to ``build_detector``
            with the architecture arguments above (``detectors.models.DETECTOR_ARGUMENTS``).
    """

    arch: str = ""
    loss_names: tuple[str, ...] = ()  # the keys of the torchvision model's loss dict

    def __init__(
        self,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        backbone: str = "resnet50_fpn",
        weights: str | None = None,
        weights_backbone: str | None = None,
        weights_path: str | None = None,
        backbone_checkpoint: str | None = None,
        if_checkpoint_missing: Literal["raise", "warn"] = "raise",
        trainable_backbone_layers: int | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        anchor_sizes: list[list[int]] | list[int] | None = None,
        aspect_ratios: list[float] | None = None,
        fpn_channels: int | None = None,
        returned_layers: list[int] | None = None,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        detections_per_img: int = 100,
        optimizer: Optimizer = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        backbone_lr_scale: float = 1.0,
        warmup_iters: int = 100,
        warmup_factor: float = 0.001,
        lr_milestones: list[int] | None = None,
        lr_gamma: float = 0.1,
        cosine_decay: bool = False,
        compute_val_loss: bool = True,
        channels_last: bool = False,
        pretrained_layout: bool = False,
        frozen_bn_eps: float | None = None,
        **detector_options: Any,
    ):
        super().__init__()
        if not self.loss_names:
            raise TypeError(f"{type(self).__name__} must set loss_names, the keys of its model's loss dict")
        # Records the subclass' own arguments too (they arrive in detector_options): everything
        # load_model needs to rebuild the architecture.
        self.save_hyperparameters()
        self.num_classes = num_classes = _count_classes(num_classes, class_names)
        _check_training_options(optimizer, backbone_lr_scale)
        # Epoch means of the losses (training, validation, test), exact under DDP: training.distributed.EpochMean.
        self.loss_means = epoch_means([n for stage in ("train", "val", "test") for n in self._loss_log_names(stage)])
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(1, num_classes)]
        architecture = {k: v for k, v in self.hparams.items() if k in DETECTOR_ARGUMENTS} | detector_options
        architecture["pretrained_layout"] = layout.pretrained_layout(self.hparams)
        self.model = self.build_model(num_classes=num_classes, **architecture)
        if backbone_checkpoint is not None:
            eps = layout.copy_checkpoint_body(self.model, self.hparams)
            if eps is not None:  # the state dict holds no eps, and load_model rebuilds without the checkpoint
                self.hparams["frozen_bn_eps"] = eps
        if channels_last:
            use_channels_last(self.model)
        self.val_metrics = DetectionEvaluator(self.class_names)
        self.test_metrics = DetectionEvaluator(self.class_names)

    @classmethod
    def offline_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Rebuild without fetching weights, in the layout they imply: ``detectors.layout.offline_hparams``."""
        return layout.offline_hparams(cls.arch, hparams)

    def build_model(self, **kwargs: Any) -> torch.nn.Module:
        return build_detector(self.arch, **kwargs)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Eval-mode detections: per image ``boxes [D, 4]`` XYXY pixels, ``scores [D]``, ``labels [D]`` in 1..K
        (float32 heads even under mixed precision, see ``detectors.val_loss``)."""
        if self.model.training:
            raise RuntimeError("forward() returns detections: call .eval() first (training_step computes losses)")
        return without_background(losses_and_detections(self.model, list(images))[1])

    def export_adapter(self, batch_size: int = 1):
        """What ``train.py export`` exports and checks (``detectors.export.DetectorExport``)."""
        from .export import DetectorExport

        return DetectorExport(self, batch_size)

    def setup(self, stage: str) -> None:
        precision = str(getattr(self._trainer, "precision", ""))  # None when called without a Trainer
        if precision in ("16-true", "bf16-true"):
            # Every weight in half precision leaves no float32 heads: half-precision boxes are rounded to 2-8 px
            # steps (detectors.val_loss), and torchvision's CPU NMS has no bfloat16 kernel.
            raise BadValueError(f"{type(self).__name__}: precision {precision!r} puts the detection heads in half "
                             f"precision; use {precision.replace('true', 'mixed')!r} (half-precision backbone, "
                             "float32 heads) or 32")

    # -- training ----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        images, targets = batch
        if len(images) == 0:  # every sample of the batch was skipped as unreadable
            return self.skip_empty_batch(self._loss_log_names("train"), training=True, stop_together=True)
        error = None
        try:
            losses = training_losses(self.model, list(images), _loss_targets(targets))
        except Exception as e:  # a box torchvision refuses, out of memory...: raised below, on every process
            losses, error = {}, e
        loss = sum(losses.values())
        if error is None and not torch.isfinite(loss):
            ids = [t.get("image_id") for t in targets]
            error = FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step} (image ids {ids}); components: "
                f"{ {k: v.item() for k, v in losses.items()} }. Lower the LR or lengthen warm-up."
            )
        self.stop_together(error)
        self.log("train_loss_step", loss, prog_bar=True, batch_size=len(images))
        # Epoch values gathered across processes (callbacks monitoring them must agree on every rank).
        self.log_epoch_means({"train_loss": loss, **{f"train_{k}": v for k, v in losses.items()}}, len(images))
        return loss

    def _loss_log_names(self, stage: str) -> list[str]:
        """The loss names a stage logs, in the order every process logs them (the epoch-end syncs pair up)."""
        return [f"{stage}_loss", *(f"{stage}_{k}" for k in self.loss_names)]

    # -- validation / test -------------------------------------------------------------------------------
    def _eval_step(self, batch, metrics: DetectionEvaluator, prefix: str) -> None:
        images, targets = batch
        with_loss = self.hparams.compute_val_loss
        if len(images) == 0:  # every sample of the batch was skipped as unreadable
            names = self._loss_log_names(prefix) if with_loss else []
            self.skip_empty_batch(names, training=False, prog_bar={f"{prefix}_loss"})
            return
        losses, detections = losses_and_detections(
            self.model, list(images), _loss_targets(targets) if with_loss else None
        )
        metrics.update(without_background(detections), list(targets))
        if losses:
            self._log_losses(prefix, losses, len(images))

    def _log_losses(self, prefix: str, losses: dict[str, Tensor], n: int) -> None:
        self.log_epoch_means({f"{prefix}_loss": sum(losses.values())}, n, prog_bar=True)
        self.log_epoch_means({f"{prefix}_{k}": v for k, v in losses.items()}, n)

    def _log_metrics(self, metrics: DetectionEvaluator, prefix: str) -> None:
        if not self.computes_epoch_metric(metrics, metrics.local_images > 0, lambda: metrics.update([], [])):
            metrics.reset()
            return
        # Under DDP compute() gathers every process' images on rank 0, scores them there once and hands
        # every process that same dict, so every process logs (and its callbacks decide on) equal values.
        values = metrics.compute()
        metrics.reset()
        # Only scalars reach the logger (val_map, val_ap/<class>, ...).
        self.log_gathered({f"{prefix}_map_50": values.pop("map_50")}, prog_bar=True)
        self.log_gathered({f"{prefix}_{k}": float(v) for k, v in values.items()})

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Detections per image with its ``image_id`` (when the batch has targets) on the CPU."""
        paired = (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], (tuple, list))
                  and all(isinstance(t, dict) for t in batch[1]))  # fmt: skip
        images, targets = batch if paired else (batch, None)
        if len(images) == 0:
            return []
        detections = self(images)
        out = []
        for i, det in enumerate(detections):
            item = {k: v.detach().cpu() for k, v in det.items()}
            if targets is not None:
                item["image_id"] = targets[i].get("image_id", i) if isinstance(targets[i], dict) else targets[i]
            out.append(item)
        return out

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]  # frozen layers stay out of the optimiser
        if hp.backbone_lr_scale != 1.0:
            body = {id(p) for p in backbone_body(self.model).parameters()}
            params = [{"params": [p for p in params if id(p) in body], "lr": hp.lr * hp.backbone_lr_scale,
                       "name": "backbone"},
                      {"params": [p for p in params if id(p) not in body], "name": "heads"}]  # fmt: skip
            params = [g for g in params if g["params"]]
        precision = getattr(self._trainer, "precision", None)
        opt = build_optimizer(hp.optimizer, params, hp.lr, hp.momentum, hp.weight_decay, precision)
        return [opt], lr_schedulers(opt, hp.warmup_iters, hp.warmup_factor, hp.lr_milestones, hp.lr_gamma,
                                    hp.cosine_decay)

    def on_train_start(self) -> None:
        """The cosine's length, from the Trainer's count of the run's optimiser steps (the same on resuming).

        Not in ``configure_optimizers``: counting the steps there sets up the train loader and creates its first
        iterator, which draws a random seed, before a resumed run restores its checkpoint's RNG state (Lightning
        calls ``configure_optimizers`` first; ``training.callbacks.ModelCheckpoint`` restores at fit start). The
        first resumed epoch then drew another data order, and the run ended with other weights. Here the loader
        exists already: the count reads its length and draws nothing."""
        super().on_train_start()
        if self.hparams.cosine_decay:
            schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
            set_cosine_length(schedulers, self.trainer.estimated_stepping_batches)

    def parameter_counts(self) -> tuple[int, int]:
        """(total, trainable) parameters of the detector."""
        return count_parameters(self.model)


class FasterRCNNModule(DetectionModule):
    """Two-stage detector: torchvision Faster R-CNN (RPN proposals, then ROI classification).

    Takes :class:`DetectionModule`'s arguments, plus:
        rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train, rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test:
            RPN proposals kept before/after NMS in training and testing.
        rpn_score_thresh: drop proposals below this objectness (torchvision: 0.05 for MobileNetV3, else 0;
            use 0 when training from scratch, whose early objectness scores are all near 0).
        box_batch_size_per_image: ROIs sampled per image for the box head.
        box_representation_size: width of the two-layer box head (torchvision: 1024).
    None keeps torchvision's defaults.
    """

    arch = "fasterrcnn"
    loss_names = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")

    def __init__(
        self,
        rpn_pre_nms_top_n_train: int | None = None,
        rpn_post_nms_top_n_train: int | None = None,
        rpn_pre_nms_top_n_test: int | None = None,
        rpn_post_nms_top_n_test: int | None = None,
        rpn_score_thresh: float | None = None,
        box_batch_size_per_image: int | None = None,
        box_representation_size: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_score_thresh=rpn_score_thresh,
            box_batch_size_per_image=box_batch_size_per_image,
            box_representation_size=box_representation_size,
            **kwargs,
        )


class RetinaNetModule(DetectionModule):
    """One-stage detector: torchvision RetinaNet (dense anchors, focal loss).

    Takes :class:`DetectionModule`'s arguments, plus ``group_norm_head``: GroupNorm in the head towers
    (as torchvision's ``_v2`` has) for the composed backbones; it trains markedly better from scratch; and
    ``p6p7``: the two extra pyramid levels computed from P5 (the paper's, default); False keeps the body's
    maps only (composed backbones), e.g. for small images (``detectors.models.build_detector``).
    ``detections_per_img`` defaults to 100 (torchvision: 300) so both detector types are scored under
    COCO's maxDets=100.
    """

    arch = "retinanet"
    loss_names = ("classification", "bbox_regression")

    def __init__(self, group_norm_head: bool = False, p6p7: bool = True, **kwargs: Any):
        super().__init__(group_norm_head=group_norm_head, p6p7=p6p7, **kwargs)
