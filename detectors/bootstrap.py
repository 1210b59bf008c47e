"""The paired bootstrap over images of the mAP difference between detectors on the same split.

``B`` resamples of the split's image indices with replacement, drawn as
``numpy.random.default_rng(seed).integers(0, n, size=(B, n))`` (:func:`resample_indices`); the same indices
serve every model, and a repeated image counts as a separate image. Each resample's mAP is pycocotools' own,
re-accumulated from one per-image matching of each model (:class:`~detectors.evaluation.ResampledCocoMap`).
The 95% interval of ``mAP_A - mAP_B`` is the 2.5..97.5th percentile of the ``B`` resampled differences
(percentile bootstrap, :func:`difference_interval`); the reported difference is the one measured on the whole
split. An interval that excludes 0 says the ranking is unlikely to be an accident of which images happen to be
in the split.

Cost: one COCO matching per model, then ``B`` pycocotools ``accumulate()`` calls per model (about 0.02 s each
for 60 images of 100 detections on one CPU core, growing with images x classes), so ``resamples`` is worth
lowering on large splits.

Inputs are the per-image dicts of ``detectors.evaluation``, one of each per image in the same order:
prediction ``boxes: FloatTensor[D, 4]`` x1 y1 x2 y2 absolute pixels, ``scores: FloatTensor[D]``,
``labels: Int64Tensor[D]`` in 1..K; target ``boxes: FloatTensor[G, 4]`` x1 y1 x2 y2, ``labels:
Int64Tensor[G]``, optional ``iscrowd`` and ``area``. Label ``k`` is ``class_names[k - 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from training.errors import BadValueError

from .evaluation import ResampledCocoMap

__all__ = ["BootstrapResult", "bootstrap_maps", "difference_interval", "paired_bootstrap", "resample_indices"]


@dataclass
class BootstrapResult:
    """``observed``: mAP_A - mAP_B on the whole split; ``low``/``high``: percentile interval of the
    resampled differences ``deltas`` [B] (NaN for a resample without any ground truth)."""

    observed: float
    low: float
    high: float
    resamples: int
    seed: int
    confidence: float
    deltas: np.ndarray = field(repr=False)

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def resample_indices(num_images: int, resamples: int, seed: int) -> np.ndarray:
    """Indices drawn with replacement, int [resamples, num_images]; row b is resample b of every model."""
    return np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images))


def bootstrap_maps(
    preds_per_model: Sequence[Sequence[dict]],
    targets: Sequence[dict],
    class_names: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
    step: Callable[[], object] | None = None,
) -> np.ndarray:
    """mAP of every model on every resample (:func:`resample_indices`), float64 [models, resamples].

    ``preds_per_model[m][i]`` and ``targets[i]`` are per-image dicts (``detectors.evaluation``) of image i.
    ``step`` is called after each resample (progress display).
    """
    return _resampled_maps(_evaluators(preds_per_model, targets, class_names), len(targets), resamples, seed,
                           step)  # fmt: skip


def _evaluators(preds_per_model: Sequence[Sequence[dict]], targets: Sequence[dict],
                class_names: Sequence[str]) -> list[ResampledCocoMap]:  # fmt: skip
    if any(len(p) != len(targets) for p in preds_per_model):
        raise BadValueError(f"every model needs one prediction dict per image ({len(targets)} images)")
    return [ResampledCocoMap(preds, targets, class_names) for preds in preds_per_model]


def _resampled_maps(evaluators: list[ResampledCocoMap], num_images: int, resamples: int, seed: int,
                    step: Callable[[], object] | None = None) -> np.ndarray:  # fmt: skip
    maps = np.empty((len(evaluators), resamples))
    for b, idx in enumerate(resample_indices(num_images, resamples, seed)):
        for m, evaluator in enumerate(evaluators):
            maps[m, b] = evaluator.map(idx)
        if step is not None:
            step()
    return np.where(maps < 0, math.nan, maps)  # -1: no ground truth in the resample


def difference_interval(
    observed: float, maps_a: np.ndarray, maps_b: np.ndarray, seed: int, confidence: float = 0.95
) -> BootstrapResult:
    """Percentile interval of ``maps_a - maps_b`` (paired: the same resamples) around ``observed``."""
    deltas = np.asarray(maps_a, dtype=np.float64) - np.asarray(maps_b, dtype=np.float64)
    tail = 100 * (1 - confidence) / 2
    low = high = math.nan
    if np.isfinite(deltas).any():
        low, high = (float(v) for v in np.nanpercentile(deltas, [tail, 100 - tail]))
    return BootstrapResult(observed, low, high, len(deltas), seed, confidence, deltas)


def paired_bootstrap(
    preds_a: Sequence[dict],
    preds_b: Sequence[dict],
    targets: Sequence[dict],
    class_names: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap over images of mAP_A - mAP_B (module docstring) for two models' detections."""
    evaluators = _evaluators([preds_a, preds_b], targets, class_names)
    map_a, map_b = (e.map(np.arange(len(targets))) for e in evaluators)
    observed = map_a - map_b if min(map_a, map_b) >= 0 else math.nan
    maps = _resampled_maps(evaluators, len(targets), resamples, seed)
    return difference_interval(observed, maps[0], maps[1], seed, confidence)
