"""A detector's confusion matrix: which class it gives the objects it finds, what it finds on nothing, what it
misses.

:func:`confusion_matrix` matches one model's detections to the ground truth at one IoU threshold (default 0.5)
among the detections scoring at least ``score_threshold`` (default 0.25) and counts the outcome in a
(K+1)x(K+1) matrix, **rows the predicted class, columns the true class**, index K (last) the background:

- ``matrix[p, t]``, p, t < K: an object of class t+1 matched by a detection labelled p+1 (the diagonal:
  correct; off it: found with the wrong class);
- ``matrix[p, K]``: a detection labelled p+1 that took no object (a background false positive: on nothing, or
  a duplicate on an object another detection took);
- ``matrix[K, t]``: an object of class t+1 no detection took (missed);
- ``matrix[K, K]`` is always 0 (background never predicted on background is not counted).

Matching, per image, each detection and each object used at most once, detections in descending score order
(stable: input order on ties):

1. Same class, the COCO way (pycocotools' ``evaluateImg`` at one IoU threshold): a detection takes the
   untaken object of its class with the highest IoU >= the threshold. Failing that, a detection overlapping
   an ignored region of its class (``iscrowd`` by pycocotools' intersection over the detection's area,
   ``difficult`` by IoU as the VOC devkit does) by at least the threshold is ignored: counted nowhere, and an
   ignored region absorbs any number of them. Ignored regions are never missed objects. So the diagonal is
   exactly the true positives COCO evaluation counts at this IoU among these detections, and a row's
   off-diagonal sum is the false positives it counts for that class.
2. Wrong class: a detection left over takes the untaken object (of any class; only other classes remain)
   with the highest IoU >= the threshold: a confusion.
3. Detections still left are background false positives; ``duplicates`` counts those that overlap an already
   taken object by at least the threshold. Objects still untaken are missed.

Same class first means a correct detection is never displaced by a higher-scored wrong-class one on the same
object: that wrong-class box is a duplicate, the false positive COCO evaluation also counts. Ultralytics'
``ConfusionMatrix`` differs (docs/compare.md, "Confusion matrices").

Inputs are the evaluators' per-image dicts (``detectors.evaluation``): predictions ``boxes: FloatTensor[D, 4]``
x1 y1 x2 y2 absolute pixels, ``scores: FloatTensor[D]``, ``labels: Int64Tensor[D]`` in 1..K; targets
``boxes: FloatTensor[G, 4]``, ``labels: Int64Tensor[G]``, optional ``iscrowd`` / ``difficult`` [G].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from training.errors import BadValueError

from .evaluation.inputs import as_cpu, check_inputs

__all__ = ["Confusion", "confusion_matrix", "match_image"]

ERROR_KINDS = {"wrong_class": "wrong class", "background_fp": "background false positives",
               "missed": "missed objects"}  # fmt: skip


@dataclass
class Confusion:
    """One model's matrix and how it was made (module docstring).

    ``matrix``: int64 [K+1, K+1], rows predicted class, columns true class, index K background;
    ``duplicates``: background false positives overlapping an object another detection took;
    ``ignored``: detections absorbed by crowd / difficult regions (in no cell)."""

    matrix: np.ndarray
    class_names: list[str]
    iou_threshold: float
    score_threshold: float
    duplicates: int = 0
    ignored: int = 0

    @property
    def correct(self) -> int:
        return int(np.trace(self.matrix[:-1, :-1]))

    @property
    def wrong_class(self) -> int:
        return int(self.matrix[:-1, :-1].sum()) - self.correct

    @property
    def background_fp(self) -> int:
        return int(self.matrix[:-1, -1].sum())

    @property
    def missed(self) -> int:
        return int(self.matrix[-1, :-1].sum())

    @property
    def objects(self) -> int:
        """Objects counted (not ignored): the sum of the K class columns."""
        return int(self.matrix[:, :-1].sum())

    @property
    def errors(self) -> int:
        return self.wrong_class + self.background_fp + self.missed

    def shares(self) -> dict[str, float]:
        """Each kind of error (:data:`ERROR_KINDS`) as a fraction of all errors; NaN when there are none."""
        total = self.errors
        return {k: getattr(self, k) / total if total else math.nan for k in ERROR_KINDS}

    def normalised(self) -> np.ndarray:
        """float64 [K+1, K+1]: each column divided by its sum (normalised by true class: column t is where the
        objects of class t went, its diagonal cell the recall at these thresholds; the background column is
        how the background false positives split over the predicted classes). NaN in empty columns and in
        the background/background cell."""
        sums = self.matrix.sum(axis=0, keepdims=True).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.matrix / np.where(sums > 0, sums, np.nan)
        out[-1, -1] = math.nan
        return out

    def reading(self, name: str) -> str:
        """The one-line reading of the report: the split of the errors, and how many objects were found."""
        if not self.errors:
            return f"{name}: no errors; {self.correct} of {self.objects} objects found with the right class"
        shares = self.shares()
        dup = f" ({self.duplicates} of them duplicates on found objects)" if self.duplicates else ""
        return (f"{name}: of its {self.errors} errors, {shares['wrong_class']:.0%} wrong class, "
                f"{shares['background_fp']:.0%} background false positives{dup}, {shares['missed']:.0%} "
                f"missed objects; {self.correct} of {self.objects} objects found with the right "
                "class")  # fmt: skip

    def table(self) -> list[list[str | int]]:
        """The CSV: a header (``predicted \\ true``, the class names, ``background``), then one row of counts
        per predicted class and the background row."""
        labels = [*self.class_names, "background"]
        return [["predicted \\ true", *labels],
                *([label, *map(int, row)] for label, row in zip(labels, self.matrix, strict=True))]  # fmt: skip

    def to_dict(self) -> dict:
        """comparison.json's ``confusion`` of a model: thresholds, labels, counts, error counts and shares."""
        return {"iou_threshold": self.iou_threshold, "score_threshold": self.score_threshold,
                "labels": [*self.class_names, "background"], "matrix": self.matrix.tolist(),
                "correct": self.correct, "objects": self.objects, "errors": self.errors,
                **{k: getattr(self, k) for k in ERROR_KINDS}, "duplicates": self.duplicates,
                "ignored": self.ignored, "shares": self.shares()}  # fmt: skip


def _overlaps(d_boxes: torch.Tensor, g_boxes: torch.Tensor, crowd: np.ndarray) -> np.ndarray:
    """float64 [D, G]: IoU (``torchvision.ops.box_iou``), except for crowd columns the intersection over the
    detection's area (pycocotools' crowd overlap: a box inside a crowd region overlaps it fully)."""
    iou = box_iou(d_boxes, g_boxes).numpy()
    if crowd.any():
        d, g = d_boxes.numpy()[:, None, :], g_boxes.numpy()[None, crowd, :]
        wh = np.clip(np.minimum(d[..., 2:], g[..., 2:]) - np.maximum(d[..., :2], g[..., :2]), 0, None)
        area = (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1])
        with np.errstate(invalid="ignore", divide="ignore"):
            iou[:, crowd] = np.nan_to_num(wh.prod(-1) / area)  # a zero-area detection overlaps nothing
    return iou


def _best(overlap: np.ndarray, allowed: np.ndarray, threshold: float) -> int:
    """Index of the highest ``overlap`` among ``allowed`` columns that reaches ``threshold``; -1 if none."""
    candidates = np.where(allowed & (overlap >= threshold), overlap, -1.0)
    j = int(np.argmax(candidates)) if len(candidates) else -1
    return j if j >= 0 and candidates[j] >= 0 else -1


def match_image(
    overlap: np.ndarray, d_labels: np.ndarray, g_labels: np.ndarray, ignored: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """The three steps of the module docstring in one image, detections already in descending score order.

    ``overlap``: float64 [D, G] (:func:`_overlaps`); ``d_labels`` int [D], ``g_labels`` int [G];
    ``ignored`` bool [G]. Returns (the object each detection took, int [D], -1 none, -2 ignored; whether each
    object was taken, bool [G]; the number of duplicates)."""
    taken_by = np.full(len(d_labels), -1)
    taken = np.zeros(len(g_labels), dtype=bool)
    for i, label in enumerate(d_labels):  # 1. same class, regular objects first, then ignored regions
        same = g_labels == label
        j = _best(overlap[i], same & ~ignored & ~taken, threshold)
        if j >= 0:
            taken_by[i], taken[j] = j, True
        elif _best(overlap[i], same & ignored, threshold) >= 0:
            taken_by[i] = -2
    for i in np.flatnonzero(taken_by == -1):  # 2. wrong class, on objects still untaken
        j = _best(overlap[i], ~ignored & ~taken, threshold)
        if j >= 0:
            taken_by[i], taken[j] = j, True
    left = taken_by == -1  # 3. background false positives; duplicates overlap a taken object
    duplicates = int((overlap[left][:, taken & ~ignored] >= threshold).any(axis=1).sum()) if left.any() else 0
    return taken_by, taken, duplicates


def confusion_matrix(
    preds: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str], iou_threshold: float = 0.5,
    score_threshold: float = 0.25,
) -> Confusion:  # fmt: skip
    """The confusion matrix of per-image ``preds`` against ``targets`` (same order; labels 1..K, label i + 1
    is ``class_names[i]``), counting the detections with score >= ``score_threshold`` matched at IoU >=
    ``iou_threshold`` (module docstring)."""
    if not 0 < iou_threshold <= 1 or not 0 <= score_threshold <= 1:
        raise BadValueError(f"confusion matrix: need 0 < IoU threshold <= 1 and 0 <= score threshold <= 1, got "
                            f"{iou_threshold} and {score_threshold}")  # fmt: skip
    k = len(class_names)
    check_inputs(preds, targets, k)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    duplicates = ignored_dets = 0
    for p, t in zip(preds, targets, strict=True):
        scores = as_cpu(p["scores"], torch.float64).reshape(-1)
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[scores[order] >= score_threshold]
        d_boxes = as_cpu(p["boxes"], torch.float64).reshape(-1, 4)[order]
        d_labels = as_cpu(p["labels"], torch.int64).reshape(-1)[order].numpy()
        g_boxes = as_cpu(t["boxes"], torch.float64).reshape(-1, 4)
        g_labels = as_cpu(t["labels"], torch.int64).reshape(-1).numpy()
        crowd = _flag(t, "iscrowd", len(g_labels))
        ignored = crowd | _flag(t, "difficult", len(g_labels))
        overlap = _overlaps(d_boxes, g_boxes, crowd)
        taken_by, taken, dups = match_image(overlap, d_labels, g_labels, ignored, iou_threshold)
        hit = taken_by >= 0
        np.add.at(matrix, (d_labels[hit] - 1, g_labels[taken_by[hit]] - 1), 1)
        np.add.at(matrix, (d_labels[taken_by == -1] - 1, k), 1)
        np.add.at(matrix, (k, g_labels[~taken & ~ignored] - 1), 1)
        duplicates += dups
        ignored_dets += int((taken_by == -2).sum())
    return Confusion(matrix, list(class_names), iou_threshold, score_threshold, duplicates, ignored_dets)


def _flag(target: dict, key: str, n: int) -> np.ndarray:
    """bool [n]: the target's 0/1 ``key`` (``iscrowd``, ``difficult``), all False when absent."""
    if key not in target:
        return np.zeros(n, dtype=bool)
    return as_cpu(target[key]).reshape(-1).numpy().astype(bool)
