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
from torchvision.ops import box_convert

from training.errors import BadValueError

from .inputs import BoxFormat, as_cpu, check_inputs, concat_field


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


def _boxes_xyxy(dicts: Sequence[dict], box_format: BoxFormat, plus_one: bool) -> np.ndarray:
    """Every dict's boxes concatenated, float64 XYXY [N, 4] (widened before the conversion); ``plus_one``:
    the devkit's pixel convention, width = x2 - x1 + 1 (same for intersections)."""
    parts = [as_cpu(d["boxes"], torch.float64).reshape(-1, 4) for d in dicts]
    boxes = box_convert(torch.cat(parts), box_format, "xyxy") if parts else torch.zeros(0, 4, dtype=torch.float64)
    if plus_one:
        boxes = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    return boxes.numpy()


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` and ``b[i]`` (float64 XYXY [P, 4] each) -> [P], with ``torchvision.ops.box_iou``'s
    operations in its order, so every value is bit-identical to the matrix entry it would give."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: 0 / 0 = NaN, as box_iou gives
        return inter / (area_a + area_b - inter)


def _first_per_group(groups: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Index of the first element of each group of ``groups`` after ordering by ``keys`` (the first key
    the most significant) and then by index: the lexicographic argmin per group."""
    order = np.lexsort((np.arange(len(groups)), *reversed(keys), groups))
    g = groups[order]
    return order[np.r_[True, g[1:] != g[:-1]]] if len(g) else order


def _match(d_img: np.ndarray, d_boxes: np.ndarray, d_scores: np.ndarray, d_labels: np.ndarray,
           g_img: np.ndarray, g_boxes: np.ndarray, g_labels: np.ndarray, ignored: np.ndarray,
           iou_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The devkit's greedy matching of every image at once: (tp [D], fp [D], IoU of each TP [D]), float64,
    input order. ``d_*``: detections (image index, float64 XYXY boxes, scores, labels), ``g_*``: ground
    truth, ``ignored``: bool [G] (difficult or crowd).

    A detection's best ground truth is the one of its class in its image with the highest IoU (first in
    input order on ties, like MATLAB's max; a NaN IoU, of two empty boxes, counts as the highest, like
    numpy's argmax), whether or not it is taken: the devkit never falls back to a second best. So the
    greedy walk down the scores reduces to: no ground truth of its class, or below the threshold -> FP;
    best is ignored -> neither; else the best-scored detection claiming a ground truth (input order on ties)
    is its TP and every later claimant a duplicate FP. Only (detection, ground truth) pairs of one image
    and class are formed: each detection's candidates are a range of the ground truth sorted by that key.
    """
    num_det, stride = len(d_img), int(max(d_labels.max(initial=0), g_labels.max(initial=0))) + 1
    g_key = g_img * stride + g_labels
    g_order = np.argsort(g_key, kind="stable")  # grouped by (image, class), input order within a group
    d_key = d_img * stride + d_labels
    start = np.searchsorted(g_key[g_order], d_key, "left")
    n_pairs = np.searchsorted(g_key[g_order], d_key, "right") - start
    pair_det = np.repeat(np.arange(num_det), n_pairs)
    offset = np.arange(len(pair_det)) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    pair_gt = g_order[np.repeat(start, n_pairs) + offset]
    iou = _pairwise_iou(d_boxes[pair_det], g_boxes[pair_gt])
    best = _first_per_group(pair_det, -np.where(np.isnan(iou), np.inf, iou))  # pairs are in input order
    has = n_pairs > 0
    best_gt, best_iou = np.zeros(num_det, dtype=np.int64), np.zeros(num_det)
    best_gt[has], best_iou[has] = pair_gt[best], iou[best]
    hit = has & ~(best_iou < iou_threshold)  # a NaN IoU is no "below"
    claim = hit.copy()
    claim[hit] = ~ignored[best_gt[hit]]
    claimants = np.flatnonzero(claim)
    winners = claimants[_first_per_group(best_gt[claimants], -d_scores[claimants])]
    tp, fp, tp_iou = np.zeros(num_det), np.zeros(num_det), np.zeros(num_det)
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

    The greedy order only matters among detections of one image and class, so all images are matched at
    once on flat arrays (:func:`_match`) and the results ranked with a stable global sort."""
    check_inputs(preds, targets, num_classes)
    d_labels, g_labels = concat_field(preds, "labels", torch.int64), concat_field(targets, "labels", torch.int64)
    d_img = np.repeat(np.arange(len(preds)), [len(p["labels"]) for p in preds])
    g_img = np.repeat(np.arange(len(targets)), [len(t["labels"]) for t in targets])
    ignored = (concat_field(targets, "difficult", torch.int64) != 0) | (concat_field(targets, "iscrowd", torch.int64) != 0)
    npos = np.bincount(g_labels[~ignored] - 1, minlength=num_classes).astype(np.int64)
    scores = concat_field(preds, "scores", torch.float64)
    tp, fp, tp_iou = _match(d_img, _boxes_xyxy(preds, box_format, plus_one), scores, d_labels, g_img,
                            _boxes_xyxy(targets, box_format, plus_one), g_labels, ignored, iou_threshold)  # fmt: skip
    order = np.argsort(-scores, kind="stable")  # ties: image order, then input order
    per_class = [order[d_labels[order] == k + 1] for k in range(num_classes)]
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
