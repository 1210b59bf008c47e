"""The classifier's part of ``train.py export`` (``training.export``): a plain graph with the normalisation
inside, its metadata and the comparison with the eager module.

The exported graph: ``images`` FloatTensor[B, 3, H, W], RGB in 0..1 (the module normalises with its weights'
mean and std itself) -> ``logits`` FloatTensor[B, K] and ``probabilities`` FloatTensor[B, K] (softmax). Batch,
height and width are free in every format (global average pooling takes any size; the accuracy is the
training size's, ``image_size`` of the data config).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from training.export import CheckResult, ExportAdapter


class ClassifierGraph(nn.Module):
    """``FrozenBackboneClassifier.forward`` without the LightningModule around it, plus the softmax."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(module.backbone).eval()
        self.head = copy.deepcopy(module.head).eval()
        self.register_buffer("mean", module.mean.clone())
        self.register_buffer("std", module.std.clone())

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.head(self.backbone((images - self.mean) / self.std))
        return logits, logits.softmax(dim=-1)


class ClassifierExport(ExportAdapter):
    """``FrozenBackboneClassifier.export_adapter()``: see the module docstring."""

    output_names = ("logits", "probabilities")

    def __init__(self, module: nn.Module, batch_size: int = 1):
        super().__init__(module)
        self.batch_size = batch_size

    def graph(self, format: str) -> nn.Module:
        return ClassifierGraph(self.module).eval()

    def dynamic(self, format: str) -> dict[int, str]:
        return {0: "batch", 2: "height", 3: "width"}

    def eager(self, images: Tensor) -> list[Tensor]:
        logits = self.module(images)
        return [logits, logits.softmax(dim=-1)]

    def compare(self, exported: list[list[Tensor]], eager: list[list[Tensor]], tolerances: dict) -> CheckResult:
        """Probabilities within the score tolerance, the same top class, per image."""
        worst, n = 0.0, 0
        for batch, (got, want) in enumerate(zip(exported, eager, strict=True)):
            diff = (got[1] - want[1]).abs().amax(dim=1)
            worst, n = max(worst, float(diff.max())), n + len(diff)
            bad = (diff > tolerances["scores"]) | (got[1].argmax(dim=1) != want[1].argmax(dim=1))
            if bad.any():
                i = int(torch.nonzero(bad)[0])
                return CheckResult(False, f"batch {batch} image {i}: probabilities differ by {float(diff[i]):.2e} "
                                          f"(> {tolerances['scores']:g}) or the top class differs")
        logit_diff = max(float((g[0] - w[0]).abs().max()) for g, w in zip(exported, eager, strict=True))
        return CheckResult(True, f"{n} images, top classes equal, probabilities max |diff| {worst:.1e} "
                                 f"(<= {tolerances['scores']:g}), logits {logit_diff:.1e}")

    def metadata(self, data: Any, format: str) -> dict[str, Any]:
        return {"task": "classification", "model_class": type(self.module).__name__,
                "class_names": list(self.module.class_names), "backbone": self.module.hparams.get("backbone"),
                "input": "images: float32[B, 3, H, W], RGB in 0..1; normalised inside",
                "outputs": "logits float32[B, K]; probabilities float32[B, K] (softmax)", "batch_size": "dynamic",
                "image_mean": self.module.mean.flatten().tolist(), "image_std": self.module.std.flatten().tolist()}
