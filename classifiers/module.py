"""The Keras transfer-learning recipe as a LightningModule.

Keras::

    base = ResNet50(weights="imagenet", include_top=False)
    for idx, layer in enumerate(base.layers):
        layer.trainable = idx >= 200
    x = GlobalAveragePooling2D()(base.output)
    outputs = Dense(num_classes, activation="softmax")(x)

litvision::

    FrozenBackboneClassifier(backbone="resnet50", num_classes=K, weights="DEFAULT", freeze=200)

Frozen layers behave as Keras' ``trainable = False``: their parameters get no
gradient and are left out of the optimiser, and frozen BatchNorm layers run in
inference mode (running statistics used, never updated) even while the module
trains. Inputs are float images ``[B, 3, H, W]`` in 0..1; the module normalises
them itself with the weights' mean/std (ImageNet's when not pretrained), so a
reloaded model needs no separate preprocessing.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from training.distributed import DistributedSteps, epoch_means
from training.errors import BadValueError
from training.optim import build_optimizer
from training.saving import SavableModule, copy_backbone

from .backbones import build_backbone, leaf_layers, select_layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GAPHead(nn.Sequential):
    """GlobalAveragePooling2D + Dense: ``[B, C, h, w] -> [B, num_classes]`` logits.

    The Linear layer starts as Keras' ``Dense``: Glorot-uniform weight, zero bias.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), dropout=nn.Dropout(dropout),
                fc=nn.Linear(in_features, num_classes),
            )  # fmt: skip
        )
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)


class FrozenBackboneClassifier(SavableModule, DistributedSteps, L.LightningModule):
    """A torchvision backbone (classifier removed) + GAP + Linear head, with Keras-style freezing.

    Args:
        backbone: resnet18/34/50, mobilenet_v3_small/large, efficientnet_b0, convnext_tiny.
        num_classes: output classes; may be omitted when ``class_names`` is given.
        class_names: names for per-class metrics (label i -> class_names[i]).
        weights: torchvision ImageNet weights ("DEFAULT", "IMAGENET1K_V1"...), read from the hub cache
            ($TORCH_HOME) or downloaded; None for random initialisation.
        weights_path: local torchvision classification state dict (its classifier is ignored).
        backbone_checkpoint: a litvision Faster R-CNN/RetinaNet checkpoint whose backbone body
            (same architecture, e.g. ``resnet18_fpn`` for ``resnet18``) is copied into this backbone.
        freeze: "all" (the whole backbone), "none", N (the first N layers of ``train.py layers``), or a
            list of module-name prefixes (``["conv1", "layer1"]``).
        if_checkpoint_missing: "warn" trains from the initial weights (with a warning) when
            ``backbone_checkpoint`` does not exist yet, e.g. before the detector demo has run.
        head_dropout: dropout before the Linear layer.
        bn_momentum: momentum of the backbone's BatchNorm running statistics in PyTorch's convention
            (Keras' ``momentum=0.99`` is PyTorch's 0.01). None keeps torchvision's: 0.1 for ResNet, 0.01 for
            MobileNetV3/EfficientNet, whose running statistics then lag far behind the weights of a network
            trained from scratch for a few hundred steps, so eval-mode accuracy stays near chance; use 0.1.
        optimizer, lr, momentum, weight_decay: optimiser over the trainable parameters only.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        weights: str | None = "DEFAULT",
        weights_path: str | None = None,
        backbone_checkpoint: str | None = None,
        if_checkpoint_missing: Literal["raise", "warn"] = "raise",
        freeze: Literal["all", "none"] | int | list[str] = "all",
        head_dropout: float = 0.0,
        bn_momentum: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
    ):
        super().__init__()
        if class_names is not None:
            if num_classes is not None and num_classes != len(class_names):
                raise BadValueError(f"num_classes={num_classes} but {len(class_names)} class_names")
            num_classes = len(class_names)
        if num_classes is None or num_classes < 2:
            raise BadValueError(f"need num_classes >= 2 (or class_names), got {num_classes}")
        if sum(x is not None for x in (weights, weights_path, backbone_checkpoint)) > 1:
            raise BadValueError("give at most one of weights, weights_path, backbone_checkpoint")
        self.save_hyperparameters()
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.backbone, features, enum = build_backbone(backbone, weights, weights_path)
        if bn_momentum is not None:
            if not 0.0 < bn_momentum <= 1.0:
                raise BadValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = bn_momentum
        if backbone_checkpoint is not None:
            copy_backbone(backbone_checkpoint, self.backbone, backbone, if_checkpoint_missing)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if enum is not None and hasattr(enum.transforms(), "mean"):
            mean, std = tuple(enum.transforms().mean), tuple(enum.transforms().std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.head = GAPHead(features, num_classes, head_dropout)
        self.frozen: set[str] = set()
        self.freeze_layers(select_layers(self.backbone, freeze))
        self.criterion = nn.CrossEntropyLoss()
        self.loss_means = epoch_means(["train_loss", "val_loss"])  # exact under DDP: training.distributed.EpochMean
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_per_class = MulticlassAccuracy(num_classes, average="none")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")

    # -- freezing ----------------------------------------------------------------------------------------
    def freeze_layers(self, names: list[str]) -> None:
        """Keras ``layer.trainable = False`` for the named backbone layers."""
        modules = dict(leaf_layers(self.backbone))
        for name in names:
            for p in modules[name].parameters(recurse=False):
                p.requires_grad_(False)
            self.frozen.add(name)
        self._apply_frozen_modes()

    def unfreeze_layers(self, names: list[str]) -> list[nn.Parameter]:
        """Make layers trainable again; returns their parameters (to add to the optimiser)."""
        modules = dict(leaf_layers(self.backbone))
        params = []
        for name in names:
            self.frozen.discard(name)
            for p in modules[name].parameters(recurse=False):
                p.requires_grad_(True)
                params.append(p)
            if isinstance(modules[name], nn.modules.batchnorm._BatchNorm):
                modules[name].train(self.training)
        return params

    def _apply_frozen_modes(self) -> None:
        modules = dict(leaf_layers(self.backbone))
        for name in self.frozen:
            if isinstance(modules[name], nn.modules.batchnorm._BatchNorm):
                modules[name].eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self._apply_frozen_modes()  # frozen BatchNorm stays in inference mode, as in Keras
        return self

    # -- steps -----------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in 0..1 -> logits ``[B, num_classes]``."""
        return self.head(self.backbone((images - self.mean) / self.std))

    def export_adapter(self, batch_size: int = 1):
        """What ``train.py export`` exports and checks (``classifiers.export.ClassifierExport``)."""
        from .export import ClassifierExport

        return ClassifierExport(self, batch_size)

    def training_step(self, batch, batch_idx: int):
        images, labels = batch
        if len(labels) == 0:  # every sample of the batch was skipped as unreadable
            return self.skip_empty_batch(["train_loss"], training=True, metrics={"train_acc": self.train_acc},
                                        stop_together=True)  # joins the others' non-finite loss check
        logits = self(images)
        loss = self.criterion(logits, labels)
        # Stopped before the optimizer step: last.ckpt is never replaced by diverged weights.
        self.stop_together(None if torch.isfinite(loss) else FloatingPointError(
            f"non-finite training loss {loss.item()} at step {self.global_step} (batch {batch_idx} of the epoch). "
            "Lower the LR."))
        self.train_acc(logits, labels)
        # The epoch value is gathered across processes: callbacks monitoring train_loss must agree on every rank.
        self.log("train_loss_step", loss, prog_bar=True, batch_size=len(labels))
        self.log_epoch_means({"train_loss": loss}, len(labels))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        if len(labels) == 0:  # every sample of the batch was skipped as unreadable
            self.skip_empty_batch(["val_loss"], training=False, prog_bar={"val_loss"})
            return
        logits = self(images)
        self.log_epoch_means({"val_loss": self.criterion(logits, labels)}, len(labels), prog_bar=True)
        self.val_acc.update(logits, labels)
        self.val_acc_per_class.update(logits, labels)
        self.val_confusion.update(logits, labels)
        if self.val_top5 is not None:
            self.val_top5.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        if not self.computes_epoch_metric(self.val_acc, self.val_acc.update_count > 0):
            return
        # compute() gathers across processes
        self.log_gathered({"val_acc": self.val_acc.compute()}, prog_bar=True)
        per_class = self.val_acc_per_class.compute().tolist()
        self.log_gathered({f"val_acc/{name}": acc for name, acc in zip(self.class_names, per_class, strict=True)})
        if self.val_top5 is not None:
            self.log_gathered({"val_top5": self.val_top5.compute()})
            self.val_top5.reset()
        self.confusion_matrix = self.val_confusion.compute().cpu()  # rows: true class, columns: predicted
        for metric in (self.val_acc, self.val_acc_per_class, self.val_confusion):
            metric.reset()

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1).cpu()  # collected over the whole run: not in GPU memory

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        precision = getattr(self._trainer, "precision", None)
        return build_optimizer(hp.optimizer, params, hp.lr, hp.momentum, hp.weight_decay, precision)
