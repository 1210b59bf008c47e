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

import os
import warnings
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from training.distributed import (
    any_process,
    distributed,
    epoch_means,
    log_epoch_means,
    refuse_skip_with_sync_batchnorm,
    skipped_batch_loss,
)
from training.optim import build_optimizer
from training.saving import SavableModule, copy_backbone, default_offline_hparams

from .evaluation import DetectionEvaluator
from .models import (
    backbone_body,
    build_detector,
    count_parameters,
    frozen_bn_eps_of,
    take_frozen_bn_eps,
    use_channels_last,
)
from .val_loss import losses_and_detections, training_losses

Optimizer = Literal["sgd", "adamw"]


def _loss_targets(targets) -> list[dict[str, Tensor]]:
    """What the torchvision model trains on: plain tensors, crowd regions left out (as COCO training does)."""
    out = []
    for t in targets:
        keep = t["iscrowd"] == 0 if "iscrowd" in t else slice(None)
        out.append({"boxes": t["boxes"].as_subclass(Tensor)[keep], "labels": t["labels"][keep]})
    return out


def _has_torchvision_weights(hparams: dict[str, Any]) -> bool:
    return any(hparams.get(k) is not None for k in ("weights", "weights_backbone", "weights_path"))


def _freezes_checkpoint_body(hparams: dict[str, Any]) -> bool:
    """Whether a ``backbone_checkpoint`` body gets torchvision's pretrained layout (``__init__`` and
    ``offline_hparams`` must agree, or ``load_model`` rebuilds another model than the one saved).

    torchvision applies trainable_backbone_layers to its own weights only; a body from a litvision checkpoint
    is just as pretrained, so it gets the same layout. The layout follows the settings alone, not whether the
    file exists yet: a run resumed from the config must rebuild what it saved."""
    return (hparams.get("backbone_checkpoint") is not None and hparams.get("trainable_backbone_layers") is not None
            and not _has_torchvision_weights(hparams))


def without_background(detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Drop label-0 detections. torchvision counts background in RetinaNet's ``num_classes`` but never trains
    it as a positive class, so early in training its logit can still pass the score threshold."""
    out = []
    for det in detections:
        keep = det["labels"] > 0
        out.append({k: v[keep] for k, v in det.items()})
    return out


class DetectionModule(SavableModule, L.LightningModule):
    """Shared training/evaluation logic; subclasses implement :meth:`build_model`.

    Args:
        num_classes: classes including background, torchvision's convention (K objects -> K + 1). May be
            omitted when ``class_names`` is given.
        class_names: object class names in label order; used to name per-class metrics.
        backbone: detector variant, see ``detectors.models.list_variants``.
        weights, weights_backbone, weights_path, trainable_backbone_layers: as torchvision defines them
            (see ``detectors.models.build_detector``).
        backbone_checkpoint: a litvision checkpoint whose backbone initialises this detector's backbone
            body: a ``FrozenBackboneClassifier`` trained on the same data (the lesson's transfer learning,
            offline) or another detector. Architectures must match (``resnet18`` <-> ``resnet18_fpn``).
            Without ``trainable_backbone_layers`` every layer of such a body trains (``backbone_lr_scale``
            slows it). With it, the body takes torchvision's pretrained layout: FrozenBatchNorm2d (all but the
            ``_v2`` variants) and all but the top ``trainable_backbone_layers`` stages frozen. Whenever the
            body has FrozenBatchNorm2d (this option, torchvision weights, ``pretrained_layout``), the
            copied statistics keep the checkpoint's eps (recorded as ``frozen_bn_eps``). The layout follows
            these settings even while the file is missing (``if_checkpoint_missing="warn"``), so a run
            resumed from its config rebuilds the same model.
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
            (the lesson's "retrain the top layers", softened): docs/benchmarks.md measures 0.3 on shapes.
            1.0 keeps a single parameter group.
        warmup_iters, warmup_factor: linear warm-up from ``lr * warmup_factor`` over the first iterations.
        lr_milestones, lr_gamma: optional epoch milestones multiplying the LR by ``lr_gamma`` (the
            torchvision reference recipe); leave empty when ReduceLROnPlateau manages the LR.
        cosine_decay: multiply the LR by a cosine from 1 to 0 over the whole run (every optimiser step of
            ``trainer.max_epochs``/``max_steps``, which must be finite). Composes with warm-up and with
            ReduceLROnPlateau's reductions (each step multiplies the current LR).
        compute_val_loss: compute ``val_loss`` (costs the detection heads a second time, not the backbone).
        channels_last: run the detector in NHWC memory layout (same results, faster convolutions on CPUs
            and tensor-core GPUs; see ``detectors.models.use_channels_last``).
        pretrained_layout, frozen_bn_eps: the structure of a pretrained model without its weights; set by
            ``load_model`` when it rebuilds a saved model offline (see ``offline_hparams``).
        **detector_options: the subclass' architecture-specific arguments, passed to ``build_detector``.
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
        if class_names is not None:
            if num_classes is not None and num_classes != len(class_names) + 1:
                raise ValueError(
                    f"num_classes={num_classes} counts background, so it must be len(class_names) + 1 = "
                    f"{len(class_names) + 1} for class_names={class_names}"
                )
            num_classes = len(class_names) + 1
        if num_classes is None:
            raise ValueError("give num_classes (including background) or class_names")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        freeze_checkpoint_body = _freezes_checkpoint_body(self.hparams)
        if freeze_checkpoint_body and not os.path.isfile(backbone_checkpoint) and if_checkpoint_missing == "warn":
            warnings.warn(f"trainable_backbone_layers={trainable_backbone_layers} with a missing backbone_checkpoint: "
                          "the body's lower stages stay frozen at their random initial weights and its "
                          "FrozenBatchNorm2d layers normalise nothing; run the pretraining first, or set "
                          "trainable_backbone_layers to null to train every layer", stacklevel=2)
        if not backbone_lr_scale > 0:
            raise ValueError(f"backbone_lr_scale must be > 0 (freeze layers with trainable_backbone_layers), "
                             f"got {backbone_lr_scale}")
        # Epoch means of the losses (training, validation, test), exact under DDP: training.distributed.EpochMean.
        self.loss_means = epoch_means([f"{stage}_{k}" for stage in ("train", "val", "test")
                                       for k in ("loss", *self.loss_names)])  # fmt: skip
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(1, num_classes)]
        self.model = self.build_model(
            backbone=backbone,
            num_classes=num_classes,
            weights=weights,
            weights_backbone=weights_backbone,
            weights_path=weights_path,
            trainable_backbone_layers=trainable_backbone_layers,
            min_size=min_size,
            max_size=max_size,
            anchor_sizes=anchor_sizes,
            aspect_ratios=aspect_ratios,
            fpn_channels=fpn_channels,
            returned_layers=returned_layers,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            pretrained_layout=pretrained_layout or freeze_checkpoint_body,
            frozen_bn_eps=frozen_bn_eps,
            **detector_options,
        )
        if backbone_checkpoint is not None:
            donor = copy_backbone(backbone_checkpoint, backbone_body(self.model), backbone, if_checkpoint_missing)
            # Frozen statistics from the checkpoint need its eps, whatever made the body frozen (this option,
            # torchvision weights, pretrained_layout); an explicit frozen_bn_eps wins. Recorded: the state dict
            # holds no eps, and load_model rebuilds without the checkpoint (offline_hparams).
            if donor is not None and frozen_bn_eps is None:
                eps = take_frozen_bn_eps(backbone_body(self.model), donor)
                if eps is not None:
                    self.hparams["frozen_bn_eps"] = eps
        if channels_last:
            use_channels_last(self.model)
        self.val_metrics = DetectionEvaluator(self.class_names)
        self.test_metrics = DetectionEvaluator(self.class_names)

    @classmethod
    def offline_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Rebuild without fetching weights, but with the layout they imply (FrozenBatchNorm2d, frozen
        stages, legacy eps), so the saved state dict fits exactly."""
        hp = dict(hparams)
        if _has_torchvision_weights(hp):
            hp["pretrained_layout"] = True
            if hp.get("frozen_bn_eps") is None:
                hp["frozen_bn_eps"] = frozen_bn_eps_of(cls.arch, hp["backbone"], hp.get("weights"), hp.get("weights_path"))
        elif _freezes_checkpoint_body(hp):
            hp["pretrained_layout"] = True  # the frozen layout __init__ gives a checkpoint body (its eps is recorded)
        return default_offline_hparams(hp)

    def build_model(self, **kwargs: Any) -> torch.nn.Module:
        return build_detector(self.arch, **kwargs)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Eval-mode detections: per image ``boxes [D, 4]`` XYXY pixels, ``scores [D]``, ``labels [D]`` in 1..K
        (float32 heads even under mixed precision, see ``detectors.val_loss``)."""
        if self.model.training:
            raise RuntimeError("forward() returns detections: call .eval() first (training_step computes losses)")
        return without_background(losses_and_detections(self.model, list(images))[1])

    def setup(self, stage: str) -> None:
        precision = str(getattr(self._trainer, "precision", ""))  # None when called without a Trainer
        if precision in ("16-true", "bf16-true"):
            # Every weight in half precision leaves no float32 heads: half-precision boxes are rounded to 2-8 px
            # steps (detectors.val_loss), and torchvision's CPU NMS has no bfloat16 kernel.
            raise ValueError(f"{type(self).__name__}: precision {precision!r} puts the detection heads in half "
                             f"precision; use {precision.replace('true', 'mixed')!r} (half-precision backbone, "
                             "float32 heads) or 32")

    # -- training ----------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        refuse_skip_with_sync_batchnorm(self)

    def training_step(self, batch, batch_idx: int):
        images, targets = batch
        if len(images) == 0:  # every sample of the batch was skipped as unreadable
            loss = skipped_batch_loss(self)
            if loss is not None:  # DDP: join the others' error check and epoch syncs, with weight 0
                self._stop_together(None)
                zero = torch.zeros((), device=self.device)
                self._log_training(zero, dict.fromkeys(self.loss_names, zero), 0)
            return loss
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
        self._stop_together(error)
        self.log("train_loss_step", loss, prog_bar=True, batch_size=len(images))
        self._log_training(loss, losses, len(images))
        return loss

    def _stop_together(self, error: Exception | None) -> None:
        """Raise ``error``, and under DDP stop every process when any has one: a process raising alone leaves
        the others waiting in the gradient all-reduce (with NCCL, until its timeout)."""
        if any_process(self, error is not None):
            raise error or RuntimeError(f"stopped at step {self.global_step}: another process failed (its error "
                                        "is in its log)")

    def _log_training(self, loss: Tensor, losses: dict[str, Tensor], n: int) -> None:
        # Epoch values gathered across processes (callbacks monitoring them must agree on every rank). Every
        # process logs every name, in the same order, or the epoch-end gathers would not pair up.
        log_epoch_means(self, self.loss_means, {"train_loss": loss, **{f"train_{k}": v for k, v in losses.items()}}, n)

    # -- validation / test -------------------------------------------------------------------------------
    def _eval_step(self, batch, metrics: DetectionEvaluator, prefix: str) -> None:
        images, targets = batch
        with_loss = self.hparams.compute_val_loss
        if len(images) == 0:  # every sample of the batch was skipped as unreadable
            if distributed(self) and with_loss:
                # Every process must enter the epoch-end syncs the others enter, even one whose whole share
                # was unreadable: the losses with weight 0 (the metric's part is in _log_metrics).
                zero = torch.zeros((), device=self.device)
                self._log_losses(prefix, dict.fromkeys(self.loss_names, zero), 0)
            return
        losses, detections = losses_and_detections(
            self.model, list(images), _loss_targets(targets) if with_loss else None
        )
        metrics.update(without_background(detections), list(targets))
        if losses:
            self._log_losses(prefix, losses, len(images))

    def _log_losses(self, prefix: str, losses: dict[str, Tensor], n: int) -> None:
        log_epoch_means(self, self.loss_means, {f"{prefix}_loss": sum(losses.values())}, n, prog_bar=True)
        log_epoch_means(self, self.loss_means, {f"{prefix}_{k}": v for k, v in losses.items()}, n)

    def _log_metrics(self, metrics: DetectionEvaluator, prefix: str) -> None:
        # compute() gathers across processes: all compute, or none (no process scored an image: a sanity
        # check with zero batches, or every batch skipped as unreadable). A process that added nothing joins
        # the gather with typed empty states (torchmetrics' own stand-ins have the wrong dtype and rank).
        if distributed(self) and metrics.update_count == 0:
            metrics.update([], [])
        if not any_process(self, metrics.local_images > 0):
            metrics.reset()
            return
        values = metrics.compute()
        metrics.reset()
        # Only scalars reach the logger; names follow DESIGN.md (val_map, val_ap/<class>, ...).
        # compute() already gathered across processes, so no sync_dist here.
        self.log(f"{prefix}_map_50", values.pop("map_50"), prog_bar=True)
        self.log_dict({f"{prefix}_{k}": float(v) for k, v in values.items()})

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
        # Chainable schedulers multiply the current LR, so reductions made by the Keras-style
        # ReduceLROnPlateau callback compose with them instead of being overwritten.
        schedulers = []
        if hp.warmup_iters > 0 and hp.warmup_factor < 1:
            warmup = torch.optim.lr_scheduler.LinearLR(opt, hp.warmup_factor, 1.0, total_iters=hp.warmup_iters)
            schedulers.append({"scheduler": warmup, "interval": "step"})
        if hp.lr_milestones:
            steps = torch.optim.lr_scheduler.MultiStepLR(opt, hp.lr_milestones, hp.lr_gamma)
            schedulers.append({"scheduler": steps, "interval": "epoch"})
        if hp.cosine_decay:
            total = self.trainer.estimated_stepping_batches
            if not 0 < total < float("inf"):
                raise ValueError("cosine_decay needs a finite run length: set trainer.max_epochs or max_steps "
                                 f"(estimated optimiser steps: {total})")
            # The closed form is never used: stepping applies the recursive (multiplicative) form, so the
            # warm-up and plateau factors carry through. eta_min=0 keeps it purely multiplicative.
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(total), eta_min=0.0)
            schedulers.append({"scheduler": cosine, "interval": "step"})
        # One name for all of them: LearningRateMonitor would log the same LR once per scheduler, as
        # "lr-AdamW", "lr-AdamW-1", ..., which reads as several optimisers.
        for config in schedulers:
            config["name"] = f"lr-{type(opt).__name__}"
        return [opt], schedulers

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
