"""A detector's confusion matrix: which class it gives the objects it finds, what it finds on nothing, what it
misses.

:func:`confusion_matrix` matches one model's detections to the ground truth at one IoU threshold (default 0.5)
among the detections scoring at least ``score_threshold`` (default 0.25) and counts the outcome in a
(K+1)x(K+1) matrix, **rows the predicted class, columns the true class**, index K (last) the background.
Every counted detection lands in exactly one cell of its row; objects nothing found land in the last row:

- ``matrix[p, p]``: correct, a detection of class p+1 that took an object of its class;
- ``matrix[p, t]``, t != p: wrong class, a detection of class p+1 on an object of class t+1;
- ``matrix[p, K]``: a background false positive, a detection of class p+1 on no object (or a duplicate of
  its own class on an object another detection of that class took: ``duplicates`` counts those);
- ``matrix[K, t]``: a missed object of class t+1, one no detection took or lies on with the wrong class;
- ``matrix[K, K]`` is always 0.

Matching, per image, detections in descending score order (stable: input order on ties):

1. Correct, the COCO way (pycocotools' ``evaluateImg`` at one IoU threshold): a detection takes the untaken
   object of its class with the highest IoU >= the threshold, each object taken once. Failing that, a
   detection overlapping an ignored region of its class by at least the threshold (``iscrowd``: pycocotools'
   intersection over the detection's area; ``difficult``: IoU, as the VOC devkit) is ignored, counted
   nowhere; a region absorbs any number of them. Ignored regions are never missed. So the diagonal is exactly
   the true positives of COCO evaluation at this IoU among these detections, and the rest of a row its false
   positives of that class.
2. Wrong class: a detection that took nothing counts against the object of another class it overlaps most at
   IoU >= the threshold, whether or not that object was also found with its own class (as TIDE, Bolya et al.
   2020, counts classification errors): a second box with another class on a found object is how a
   one-stage detector's independent per-class scores go wrong, and it must show in the off-diagonal cells.
   ``wrong_on_found`` counts those.
3. Detections still left are background false positives; objects neither taken nor lain on are missed.

A class column can therefore sum to more than the objects of its class (an object found right may also carry
wrong-class boxes, an object several), so the normalised matrix divides each class column by the number of
objects of that class (:meth:`normalised`).
Ultralytics' ``ConfusionMatrix`` differs (docs/compare.md, "Confusion matrices").

Inputs are the evaluators' per-image dicts (``detectors.evaluation``): predictions
``boxes: FloatTensor[D, 4]`` x1 y1 x2 y2 absolute pixels, ``scores: FloatTensor[D]``,
``labels: Int64Tensor[D]`` in 1..K; targets ``boxes: FloatTensor[G, 4]``, ``labels: Int64Tensor[G]``, optional
``iscrowd`` / ``difficult`` [G].
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

__all__ = ["ERROR_KINDS", "Confusion", "check_thresholds", "confusion_matrix", "match_image"]

ERROR_KINDS = ("wrong_class", "background_fp", "missed")  # what the report's line splits the errors into


@dataclass
class Confusion:
    """One model's matrix and how it was made (module docstring).

    ``matrix``: int64 [K+1, K+1], rows predicted class, columns true class, index K background;
    ``objects``: int64 [K], the objects of each class (ignored regions not counted); ``wrong_on_found``:
    wrong-class detections on objects also found with their own class; ``duplicates``: background false
    positives on an object of their class another detection took; ``ignored``: detections absorbed by crowd
    or difficult regions (in no cell)."""

    matrix: np.ndarray
    objects: np.ndarray
    class_names: list[str]
    iou_threshold: float
    score_threshold: float
    wrong_on_found: int = 0
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
    def errors(self) -> int:
        return self.wrong_class + self.background_fp + self.missed

    def shares(self) -> dict[str, float]:
        """Each kind of error (:data:`ERROR_KINDS`) as a fraction of all errors; NaN when there are none."""
        total = self.errors
        return {k: getattr(self, k) / total if total else math.nan for k in ERROR_KINDS}

    def normalised(self) -> np.ndarray:
        """float64 [K+1, K+1], normalised by true class: each class column divided by the number of objects of
        that class (diagonal: recall at these thresholds; last row: the share missed; other cells: wrong-class
        detections per object), the background column by its sum (how the background false positives split
        over the predicted classes). NaN in columns without objects or false positives, and in the
        background/background cell."""
        sums = np.append(self.objects, self.matrix[:-1, -1].sum()).astype(np.float64)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.matrix / np.where(sums > 0, sums, np.nan)
        out[-1, -1] = math.nan
        return out

    def reading(self, name: str) -> str:
        """The report's one line: the split of the errors, and how many objects were found."""
        found = f"{self.correct} of {int(self.objects.sum())} objects found with the right class"
        if not self.errors:
            return f"{name}: no errors; {found}"
        shares = self.shares()
        on_found = f" ({self.wrong_on_found} on objects also found right)" if self.wrong_on_found else ""
        dup = f" ({self.duplicates} duplicate{'s' * (self.duplicates != 1)})" if self.duplicates else ""
        return (f"{name}: of its {self.errors} errors, {shares['wrong_class']:.0%} wrong class{on_found}, "
                f"{shares['background_fp']:.0%} background false positives{dup}, "
                f"{shares['missed']:.0%} missed objects; {found}")  # fmt: skip

    def table(self) -> list[list[str | int]]:
        """The CSV: a header (``predicted \\ true``, the class names, ``background``), then one row of counts
        per predicted class and the background row."""
        labels = [*self.class_names, "background"]
        rows = ([label, *map(int, row)] for label, row in zip(labels, self.matrix, strict=True))
        return [["predicted \\ true", *labels], *rows]

    def to_dict(self) -> dict:
        """comparison.json's ``confusion`` of a model: thresholds, labels, counts, error counts and shares."""
        return {"iou_threshold": self.iou_threshold, "score_threshold": self.score_threshold,
                "labels": [*self.class_names, "background"], "matrix": self.matrix.tolist(),
                "objects": self.objects.tolist(), "correct": self.correct, "errors": self.errors,
                **{k: getattr(self, k) for k in ERROR_KINDS}, "wrong_on_found": self.wrong_on_found,
                "duplicates": self.duplicates, "ignored": self.ignored, "shares": self.shares()}  # fmt: skip


def _overlaps(d_boxes: torch.Tensor, g_boxes: torch.Tensor, crowd: np.ndarray) -> np.ndarray:
    """float64 [D, G]: IoU (``torchvision.ops.box_iou``), except for crowd columns the intersection over the
    detection's area (pycocotools' crowd overlap: a box inside a crowd region overlaps it fully)."""
    iou = box_iou(d_boxes, g_boxes).numpy()
    if crowd.any():
        d, g = d_boxes.numpy()[:, None, :], g_boxes.numpy()[None, crowd, :]
        wh = np.clip(np.minimum(d[..., 2:], g[..., 2:]) - np.maximum(d[..., :2], g[..., :2]), 0, None)
        area = (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1])
        with np.errstate(invalid="ignore", divide="ignore"):  # a zero-area detection overlaps nothing
            iou[:, crowd] = np.nan_to_num(wh.prod(-1) / area, nan=0.0)
    return iou


def _most(overlap: np.ndarray, allowed: np.ndarray) -> int:
    """Column of the highest ``overlap`` [G] among the ``allowed`` ones (at least one); the last on ties, as
    pycocotools' ``evaluateImg`` (two copies of one object: the same one taken as there)."""
    masked = np.where(allowed, overlap, -np.inf)
    return len(masked) - 1 - int(np.argmax(masked[::-1]))


def match_image(
    overlap: np.ndarray, d_labels: np.ndarray, g_labels: np.ndarray, ignored: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1 and 2 of the module docstring in one image, detections already in descending score order.

    ``overlap``: float64 [D, G] (:func:`_overlaps`); ``d_labels`` int [D], ``g_labels`` int [G];
    ``ignored`` bool [G]. Returns (the object each detection counts against, int [D]: -1 none (background),
    -2 ignored; which detections took their object with their own class, bool [D])."""
    target = np.full(len(d_labels), -1)
    correct = np.zeros(len(d_labels), dtype=bool)
    taken = np.zeros(len(g_labels), dtype=bool)
    same = d_labels[:, None] == g_labels[None, :]
    reach = overlap >= threshold  # [D, G]; a NaN IoU (two empty boxes) reaches nothing
    own = same & reach & ~ignored
    # 1. its own class, greedy in score order; only detections with a candidate can change what is taken
    for i in np.flatnonzero(own.any(axis=1)):
        free = own[i] & ~taken
        if free.any():
            j = _most(overlap[i], free)
            target[i], correct[i], taken[j] = j, True, True
    target[~correct & (same & reach & ignored).any(axis=1)] = -2  # absorbed by an ignored region of its class
    # 2. wrong class: the other class's object it overlaps most, taken or not (no order needed)
    other = ~same & reach & ~ignored
    for i in np.flatnonzero((target == -1) & other.any(axis=1)):
        target[i] = _most(overlap[i], other[i])
    return target, correct


def check_thresholds(
    iou_threshold: float,
    score_threshold: float,
    names: tuple[str, str] = ("IoU threshold", "score threshold"),
) -> None:
    """Refuse an IoU threshold outside (0, 1] or a score threshold outside [0, 1]; ``names`` as the user gave
    them (``compare``'s options)."""
    if not 0 < iou_threshold <= 1 or not 0 <= score_threshold <= 1:
        raise BadValueError(f"confusion matrix: need 0 < {names[0]} <= 1 and 0 <= {names[1]} <= 1, got "
                            f"{iou_threshold} and {score_threshold}")  # fmt: skip


def confusion_matrix(
    preds: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str], iou_threshold: float = 0.5,
    score_threshold: float = 0.25,
) -> Confusion:  # fmt: skip
    """The confusion matrix of per-image ``preds`` against ``targets`` (same order; labels 1..K, label i + 1
    is ``class_names[i]``), counting the detections with score >= ``score_threshold`` matched at IoU >=
    ``iou_threshold`` (module docstring)."""
    check_thresholds(iou_threshold, score_threshold)
    k = len(class_names)
    check_inputs(preds, targets, k)
    matrix, objects = np.zeros((k + 1, k + 1), dtype=np.int64), np.zeros(k, dtype=np.int64)
    wrong_on_found = duplicates = ignored_dets = 0
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
        target, correct = match_image(overlap, d_labels, g_labels, ignored, iou_threshold)
        on_object, background = target >= 0, target == -1
        np.add.at(matrix, (d_labels[on_object] - 1, g_labels[target[on_object]] - 1), 1)
        np.add.at(matrix, (d_labels[background] - 1, k), 1)
        found = np.zeros(len(g_labels), dtype=bool)
        found[target[correct]] = True
        lain_on = np.zeros(len(g_labels), dtype=bool)
        lain_on[target[on_object]] = True
        np.add.at(matrix, (k, g_labels[~lain_on & ~ignored] - 1), 1)
        np.add.at(objects, g_labels[~ignored] - 1, 1)
        wrong_on_found += int(found[target[on_object & ~correct]].sum())
        duplicates += int((overlap[background][:, found] >= iou_threshold).any(axis=1).sum())
        ignored_dets += int((target == -2).sum())
    return Confusion(matrix, objects, list(class_names), iou_threshold, score_threshold, wrong_on_found,
                     duplicates, ignored_dets)  # fmt: skip


def _flag(target: dict, key: str, n: int) -> np.ndarray:
    """bool [n]: the target's 0/1 ``key`` (``iscrowd``, ``difficult``), all False when absent."""
    if key not in target:
        return np.zeros(n, dtype=bool)
    return as_cpu(target[key]).reshape(-1).numpy().astype(bool)
