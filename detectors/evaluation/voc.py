"""Pascal VOC detection AP at one IoU threshold: VOC2007 11-point and VOC2010+ all-point, with the devkit's
matching rule.

The VOC numbers complement COCO's: AP50 is the number VOC-era papers report, and the IoUs of the matched
detections (``matched_iou``) say how tight the boxes that count are. ``difficult`` ground truth (and COCO's
``iscrowd``) is ignored the devkit's way; see :func:`voc_evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from training.errors import BadValueError

from .inputs import BoxFormat, as_cpu, check_inputs


def voc_ap(
    recall: np.ndarray | Sequence[float], precision: np.ndarray | Sequence[float], use_07_metric: bool = False
) -> float:
    """Pascal VOC average precision from a ranked list's cumulative recall and precision (same length).

    ``use_07_metric=True``: VOC2007 11-point interpolation, the mean over t in {0, 0.1, ..., 1} of the
    maximum precision at recall >= t (0 when no recall reaches t). The thresholds are ``i / 10`` (the nearest
    doubles), not ``np.arange(0, 1.1, 0.1)`` whose 0.30000000000000004 would miss a recall of exactly 3/10.
    ``use_07_metric=False``: VOC2010+ all-point interpolation, the area under the precision envelope
    (precision made monotonically non-increasing) summed where recall changes.
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise BadValueError(f"recall and precision differ in length: {rec.size} vs {prec.size}")
    if use_07_metric:
        ap = 0.0
        for i in range(11):
            reached = prec[rec >= i / 10]
            ap += (reached.max() if reached.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: max precision at any higher recall
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@dataclass
class VocMatches:
    """Per class k (label k + 1): detection scores, TP and FP flags (float64 0/1, ranked by descending score),
    the number of positives (non-ignored ground truth), and the IoU of each TP."""

    scores: list[np.ndarray]
    tp: list[np.ndarray]
    fp: list[np.ndarray]
    npos: np.ndarray
    tp_iou: list[np.ndarray]


def _match_image(iou: np.ndarray, same_class: np.ndarray, ignored: np.ndarray, scores: np.ndarray,
                 iou_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The devkit's greedy matching in one image: (tp [D], fp [D], IoU of each TP [D]), float64, input order.

    ``iou``: float64 [D, G] between every detection and ground truth box; ``same_class``: bool [D, G];
    ``ignored``: bool [G] (difficult or crowd); ``scores``: float64 [D].

    A detection's best ground truth is the one of its class with the highest IoU (first on ties, like
    MATLAB's max), whether or not it is taken: the devkit never falls back to a second best. So the greedy
    walk down the scores reduces to: below the threshold (or no ground truth of its class) -> FP; best is
    ignored -> neither; else the best-scored detection claiming a ground truth (input order on ties) is
    its TP and every later claimant a duplicate FP.
    """
    num_det = len(scores)
    tp, fp, tp_iou = np.zeros(num_det), np.zeros(num_det), np.zeros(num_det)
    if iou.shape[1] == 0:
        return tp, np.ones(num_det), tp_iou
    best = np.argmax(np.where(same_class, iou, -1.0), axis=1)  # [D]; other classes never win
    best_iou = iou[np.arange(num_det), best]
    # no ground truth of its class, or below the threshold: FP (a NaN IoU of two empty boxes is no "below")
    hit = same_class.any(axis=1) & ~(best_iou < iou_threshold)
    claim = hit & ~ignored[best]
    order = np.argsort(-scores, kind="stable")
    claimants = order[claim[order]]  # best-scored first
    _, first = np.unique(best[claimants], return_index=True)
    winners = claimants[first]
    tp[winners], tp_iou[winners] = 1, best_iou[winners]
    fp[~hit | (claim & (tp == 0))] = 1
    return tp, fp, tp_iou


def voc_match(
    preds: Sequence[dict],
    targets: Sequence[dict],
    num_classes: int,
    iou_threshold: float,
    plus_one: bool,
    box_format: BoxFormat = "xyxy",
) -> VocMatches:
    """VOC devkit matching: detections in descending score order (stable: image order, then input order)
    take the GT of their class with the highest IoU; IoU >= threshold and GT not taken -> TP, GT already
    taken -> FP (duplicate), GT difficult or crowd -> ignored (neither), IoU below -> FP.

    The greedy order only matters among detections of one image and class, so each image is matched alone
    (one IoU matrix, :func:`_match_image`) and the results are merged with a stable global sort."""
    check_inputs(preds, targets, num_classes)
    npos = np.zeros(num_classes, dtype=np.int64)
    columns: list[tuple[np.ndarray, ...]] = []  # per image: scores, labels, tp, fp, tp_iou
    for p, t in zip(preds, targets, strict=True):
        d_boxes = box_convert(as_cpu(p["boxes"], torch.float64).reshape(-1, 4), box_format, "xyxy")
        d_scores = as_cpu(p["scores"], torch.float64).reshape(-1).numpy()
        d_labels = as_cpu(p["labels"], torch.int64).reshape(-1).numpy()
        g_boxes = box_convert(as_cpu(t["boxes"], torch.float64).reshape(-1, 4), box_format, "xyxy")
        g_labels = as_cpu(t["labels"], torch.int64).reshape(-1).numpy()
        ignored = np.zeros(len(g_labels), dtype=bool)
        for key in ("difficult", "iscrowd"):
            if key in t:
                ignored |= as_cpu(t[key]).reshape(-1).numpy().astype(bool)
        np.add.at(npos, g_labels[~ignored] - 1, 1)
        if len(d_labels) == 0:
            continue
        if plus_one:  # devkit pixel convention: width = x2 - x1 + 1, same for intersections
            d_boxes = d_boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
            g_boxes = g_boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        iou = box_iou(d_boxes, g_boxes).numpy()  # [D, G]
        same_class = d_labels[:, None] == g_labels[None, :]
        columns.append((d_scores, d_labels, *_match_image(iou, same_class, ignored, d_scores, iou_threshold)))
    scores, labels, tp, fp, tp_iou = (
        (np.concatenate(c) for c in zip(*columns, strict=True)) if columns else (np.zeros(0),) * 5
    )
    order = np.argsort(-scores, kind="stable")  # ties: image order, then input order
    per_class = [order[labels[order] == k + 1] for k in range(num_classes)]
    return VocMatches(
        scores=[scores[i] for i in per_class],
        tp=[tp[i] for i in per_class],
        fp=[fp[i] for i in per_class],
        npos=npos,
        tp_iou=[tp_iou[i][tp[i] == 1] for i in per_class],
    )


@dataclass
class VocResult:
    """Output of :func:`voc_evaluate`. ``ap``: [K] float64, -1 for a class without (non-difficult)
    ground truth; ``map``: mean of ``ap`` over classes with ground truth (-1 if none); ``matched_iou``: per
    class the IoUs of the true-positive detections."""

    ap: np.ndarray
    map: float
    matched_iou: list[np.ndarray]


def voc_ap_per_class(m: VocMatches, use_07_metric: bool) -> tuple[np.ndarray, float]:
    """(AP per class [K] float64, -1 without positives; their mean over classes with positives, or -1)."""
    ap = -np.ones(len(m.npos))
    for k in range(len(m.npos)):
        if m.npos[k] == 0:
            continue  # recall undefined: VOC would divide by zero
        tp, fp = np.cumsum(m.tp[k]), np.cumsum(m.fp[k])
        # ignored (difficult) detections are neither TP nor FP: they stay in the ranking without moving
        # either count, which yields the same AP as dropping them
        keep = (m.tp[k] + m.fp[k]) > 0
        tp, fp = tp[keep], fp[keep]
        ap[k] = voc_ap(tp / m.npos[k], tp / np.maximum(tp + fp, np.finfo(np.float64).eps), use_07_metric)
    valid = ap > -1
    return ap, float(ap[valid].mean()) if valid.any() else -1.0


def voc_evaluate(
    preds: Sequence[dict],
    targets: Sequence[dict],
    num_classes: int,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    plus_one: bool = False,
    box_format: BoxFormat = "xyxy",
) -> VocResult:
    """Pascal VOC detection AP per class over per-image dicts (``evaluation.inputs``; labels 1..num_classes).

    Matching follows the VOC devkit (IoU >= ``iou_threshold``, greedy by score, duplicates are FP);
    ``difficult`` (and COCO ``iscrowd``) ground truth is ignored: not counted in the positives, and a
    detection whose best match it is counts as neither TP nor FP. ``use_07_metric`` selects VOC2007 11-point
    instead of VOC2010+ all-point AP (:func:`voc_ap`). ``plus_one=True`` uses the devkit's ``x2 - x1 + 1``
    pixel widths; the default measures boxes as continuous coordinates like the rest of the project.
    """
    m = voc_match(preds, targets, num_classes, iou_threshold, plus_one, box_format)
    ap, mean = voc_ap_per_class(m, use_07_metric)
    return VocResult(ap, mean, m.tp_iou)
