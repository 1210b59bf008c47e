"""Detection evaluation: COCO mAP (pycocotools-exact, via torchmetrics), Pascal VOC AP, matched IoU.

Inputs everywhere are torchvision-style per-image dicts (one dict per image, same order in both lists):

- prediction: ``boxes`` float[N, 4] XYXY absolute pixels, ``scores`` float[N], ``labels`` int64[N] in 1..K.
- target: ``boxes`` float[G, 4] XYXY, ``labels`` int64[G] in 1..K, optional ``iscrowd`` int[G] (0/1),
  optional ``area`` float[G] (the COCO annotation area; without it the box area is used, as pycocotools
  does for results), optional ``difficult`` bool[G] (VOC; only the VOC metrics read it).

Labels are contiguous, label ``i + 1`` is ``class_names[i]``. COCO category ids and XYWH boxes exist only at
the file boundary: :func:`evaluate` (a COCO results file against a COCO ground-truth file) and its loaders,
which hand the evaluator the file's XYWH boxes through ``box_format="xywh"`` (last point below).

COCO numbers come from torchmetrics ``MeanAveragePrecision`` with the faster-coco-eval backend, configured
by :func:`coco_map_metric` so that it reproduces pycocotools ``COCOeval(gt, dt, "bbox")`` (the tests compare
all 12 stats and per-class AP to pycocotools to 1e-6):

- IoU and recall thresholds are float64 ``numpy.linspace`` values, as in pycocotools; torchmetrics' defaults
  are float32 ``torch.linspace`` values (0.55 becomes 0.550000011920929), which flips matches whose IoU sits
  between the two and moves the 101 recall sampling points.
- ``area`` is forwarded so small/medium/large use the annotation area (segmentation area for COCO), not the
  box area. torchmetrics only uses an area that is ``> 0`` and silently replaces 0 by the box area, so an
  annotation area of exactly 0 is passed as the smallest positive float (same small/medium/large decision).
- ``iscrowd`` is forwarded: crowd regions are ignored GT that absorb detections, as in pycocotools.
- Nothing is truncated or filtered here. pycocotools applies ``maxDets=100`` per image AND per class (the
  top-100 detections of each class in each image), so an image may contribute more than 100 detections in
  total; torchmetrics' "more than 100 detections" warning is therefore switched off.
- Images are evaluated in the order given; :func:`evaluate` sorts them by image id like pycocotools does,
  because equal scores in different images are ranked by image order.
- Classes with no (non-crowd) ground truth get AP/AR ``-1`` and are left out of every mean, as in pycocotools.
  That includes classes that appear only in predictions.
- Per-class AP (``ap/<name>``) is computed from the precision array of the one evaluation, exactly as
  pycocotools' ``summarize()`` does for ``params.catIds = [class]``; torchmetrics' ``class_metrics=True``
  would give the same numbers (in float32) by re-running the evaluation once per class.
- pycocotools works on XYWH and takes a detection's area as ``w * h``; torchmetrics converts XYXY input
  to XYWH, so XYXY input stands for the results file that holds ``w = x2 - x1``. :func:`evaluate` therefore
  hands the file's XYWH boxes over unchanged (``box_format="xywh"``) rather than round-tripping them.

Resampling (paired bootstrap): every public function takes the per-image lists, so a resample is just
``evaluate_detections([preds[i] for i in idx], [targets[i] for i in idx], class_names)``; a repeated index
counts as a separate image, which is what a bootstrap needs; :class:`ResampledCocoMap` gives the same mAP
for many resamples at a fraction of the cost (one matching, one ``accumulate()`` per resample).
``DetectionEvaluator.images()`` returns the (DDP-gathered) lists it accumulated; :func:`coco_evaluate`
returns the precision array [T, R, K, A, M], PR curves and AP per IoU threshold and class (:class:`CocoResult`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.table import Table
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities import dim_zero_cat
from torchvision.ops import box_convert, box_iou

from training.saving import atomic_write_bytes

from .data.coco import read_json

__all__ = [
    "COCO_KEYS",
    "CocoResult",
    "DetectionEvaluator",
    "ResampledCocoMap",
    "VocResult",
    "box_iou",
    "coco_evaluate",
    "coco_map_metric",
    "evaluate",
    "evaluate_detections",
    "format_class_table",
    "format_metrics_table",
    "load_coco_ground_truth",
    "load_coco_predictions",
    "voc_ap",
    "voc_evaluate",
]

IOU_THRESHOLDS: list[float] = np.linspace(0.5, 0.95, 10).tolist()  # float64, exactly pycocotools' iouThrs
REC_THRESHOLDS: list[float] = np.linspace(0.0, 1.0, 101).tolist()  # pycocotools' recThrs
MAX_DETECTIONS: list[int] = [1, 10, 100]
# pycocotools' stats[0..11] in order, under torchmetrics' names.
COCO_KEYS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip
BoxFormat = Literal["xyxy", "xywh"]
_TINY_AREA = 5e-324  # smallest positive float64: "area 0" that torchmetrics does not replace by the box area


def coco_map_metric(**overrides) -> MeanAveragePrecision:
    """torchmetrics ``MeanAveragePrecision`` set up to reproduce pycocotools bbox evaluation.

    Defaults: faster-coco-eval backend, XYXY boxes, per-class AP, float64 IoU thresholds .50:.05:.95,
    101 recall thresholds, maxDets [1, 10, 100]. ``overrides`` replace any constructor argument
    (e.g. ``extended_summary=True`` for the precision array, ``class_metrics=False`` for speed).
    Call ``update()`` per batch and ``compute()`` once per epoch.
    """
    kwargs = dict(
        box_format="xyxy",
        iou_type="bbox",
        backend="faster_coco_eval",
        class_metrics=True,
        iou_thresholds=list(IOU_THRESHOLDS),
        rec_thresholds=list(REC_THRESHOLDS),
        max_detection_thresholds=list(MAX_DETECTIONS),
    )
    kwargs.update(overrides)
    metric = MeanAveragePrecision(**kwargs)
    metric.warn_on_many_detections = False  # maxDets is pycocotools' business (per image and class)
    return metric


# --------------------------------------------------------------------------------------------- COCO


def _mean_valid(p: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """Mean over ``axis`` of the entries > -1 (pycocotools' ``s[s > -1].mean()``), -1 where there are none."""
    valid = p > -1
    count = valid.sum(axis=axis)
    return np.where(count > 0, np.where(valid, p, 0.0).sum(axis=axis) / np.maximum(count, 1), -1.0)


@dataclass
class CocoResult:
    """Output of :func:`coco_evaluate`.

    ``metrics``: the 12 COCO stats under :data:`COCO_KEYS` plus ``ap/<class name>`` (python floats, -1 where
    pycocotools gives -1). ``precision``: float64 [T, R, K, A, M] (IoU thresholds x recall thresholds x classes
    x areas (all, small, medium, large) x maxDets), -1 where a class has no ground truth; class index ``k``
    is label ``k + 1``. ``recall``: float64 [T, K, A, M].
    """

    metrics: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    iou_thresholds: list[float]
    rec_thresholds: list[float]
    class_names: list[str]

    def ap_per_iou(self) -> np.ndarray:
        """AP per IoU threshold and class, float64 [T, K] (area all, largest maxDets); -1 without ground truth.

        ``ap_per_iou()[t].mean over classes != -1`` is mAP at ``iou_thresholds[t]``; the mean over ``t`` of a
        column is the class's COCO AP (``metrics["ap/<name>"]``).
        """
        return _mean_valid(self.precision[:, :, :, 0, -1], axis=1)  # [T, R, K] -> [T, K]

    def class_ap(self) -> np.ndarray:
        """COCO AP per class, float64 [K]: the mean of the class's precision over IoU and recall thresholds
        (area all, largest maxDets), i.e. pycocotools' ``summarize()`` with ``params.catIds = [class]``;
        -1 for a class without ground truth."""
        return _mean_valid(self.precision[:, :, :, 0, -1], axis=(0, 1))  # [T, R, K] -> [K]

    def pr_curve(self, class_index: int, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """(recall thresholds [R], interpolated precision [R]) of one class at one IoU threshold (area all,
        largest maxDets). Precision is -1 everywhere for a class without ground truth."""
        t = int(np.argmin(np.abs(np.asarray(self.iou_thresholds) - iou_threshold)))
        if abs(self.iou_thresholds[t] - iou_threshold) > 1e-9:
            raise ValueError(f"IoU threshold {iou_threshold} is not one of {self.iou_thresholds}")
        return np.asarray(self.rec_thresholds), self.precision[t, :, class_index, 0, -1].copy()


def _as_cpu(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    x = x.detach().cpu()
    return x if dtype is None else x.to(dtype)


def _metric_inputs(preds: Sequence[dict], targets: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The keys torchmetrics reads, on CPU; ``area`` of 0 made representable (see module docstring)."""
    p_out, t_out = [], []
    for p in preds:
        p_out.append(
            {
                "boxes": _as_cpu(p["boxes"]).reshape(-1, 4),
                "scores": _as_cpu(p["scores"]).reshape(-1),
                "labels": _as_cpu(p["labels"], torch.int64).reshape(-1),
            }
        )
    for t in targets:
        boxes = _as_cpu(t["boxes"]).reshape(-1, 4)
        item = {"boxes": boxes, "labels": _as_cpu(t["labels"], torch.int64).reshape(-1)}
        if "iscrowd" in t:
            item["iscrowd"] = _as_cpu(t["iscrowd"], torch.int64).reshape(-1)
        if "area" in t:
            area = _as_cpu(t["area"], torch.float64).reshape(-1)
            item["area"] = torch.where(area == 0, torch.full_like(area, _TINY_AREA), area)
        t_out.append(item)
    return p_out, t_out


def coco_evaluate(
    preds: Sequence[dict],
    targets: Sequence[dict],
    class_names: Sequence[str],
    box_format: BoxFormat = "xyxy",
    **overrides,
) -> CocoResult:
    """COCO bbox evaluation of per-image dicts (module docstring) through :func:`coco_map_metric`.

    ``box_format="xywh"`` takes COCO's boxes as they are (see :func:`evaluate`); ``overrides`` go to
    :func:`coco_map_metric` (``extended_summary=False`` skips the arrays and per-class AP, the fastest choice
    for a bootstrap of mAP alone). The metric is local and never syncs across processes: callers pass
    already-gathered lists.
    """
    names = list(class_names)
    _check_inputs(preds, targets, len(names))
    # One evaluation gives everything: per-class AP is read from its precision array (class_metrics=True
    # would re-run the evaluation once per class, K times the cost for the same numbers).
    overrides = {"extended_summary": True, "class_metrics": False, "sync_on_compute": False, **overrides}
    metric = coco_map_metric(box_format=box_format, **overrides)
    T, R, K = len(metric.iou_thresholds), len(metric.rec_thresholds), len(names)
    M = len(metric.max_detection_thresholds)
    precision, recall = -np.ones((T, R, K, 4, M)), -np.ones((T, K, 4, M))
    per_class: dict[str, float] | None = None
    if len(preds) > 0:
        metric.update(*_metric_inputs(preds, targets))
        out = metric.compute()
        metrics = {
            k: float(v) for k, v in out.items() if k.startswith(("map", "mar_")) and "per_class" not in k
        }
        # torchmetrics evaluates only the labels that occur; its class axis is their sorted list.
        classes = out["classes"].reshape(-1).tolist()
        idx = [c - 1 for c in classes]
        if "precision" in out:
            precision[:, :, idx] = out["precision"].double().numpy()
            recall[:, idx] = out["recall"].double().numpy()
        elif metric.class_metrics and out["map_per_class"].numel() == len(classes):  # else: -1 placeholder
            per_class = dict.fromkeys(names, -1.0)
            per_class.update(
                {names[c - 1]: float(v) for c, v in zip(classes, out["map_per_class"], strict=True)}
            )
    else:  # nothing to evaluate: pycocotools would have no images
        mar = [f"mar_{m}" for m in metric.max_detection_thresholds]
        metrics = dict.fromkeys([*COCO_KEYS[:6], *mar, *COCO_KEYS[9:]], -1.0)
    result = CocoResult(
        metrics, precision, recall, list(metric.iou_thresholds), list(metric.rec_thresholds), names
    )
    if metric.extended_summary:
        per_class = dict(zip(names, result.class_ap().tolist(), strict=True))
    if per_class is not None:
        result.metrics.update({f"ap/{n}": v for n, v in per_class.items()})
    return result


class ResampledCocoMap:
    """COCO mAP of image resamples from one matching: the bootstrap's evaluator.

    pycocotools' ``COCOeval.evaluate()`` matches detections to ground truth image by image and class;
    ``accumulate()`` then ranks the matched detections of a set of images and integrates precision. A
    resample (indices with repeats) reuses the per-image matches: resample position j gets image
    ``indices[j]``'s, so a repeated image counts as a separate image, exactly as evaluating the resampled
    lists from scratch (the tests check this against pycocotools on resampled data) but at the cost of one
    ``accumulate()`` per resample. Only what mAP needs is matched: area "all", maxDets 100, the float64
    thresholds of :func:`coco_map_metric`. Boxes go to pycocotools as torchmetrics hands them over (XYXY
    converted to XYWH in the tensors' dtype), so the numbers equal :func:`coco_evaluate`'s ``map`` up to its
    float32 rounding (~1e-8).

    ``preds``/``targets``: per-image dicts (module docstring), one of each per image; ``box_format`` as in
    :func:`coco_evaluate`.
    """

    def __init__(self, preds: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str],
                 box_format: BoxFormat = "xyxy") -> None:  # fmt: skip
        names = list(class_names)
        _check_inputs(preds, targets, len(names))
        p_in, t_in = _metric_inputs(preds, targets)
        images = [{"id": i} for i in range(len(targets))]
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
        gt_anns, dt_anns = [], []
        for i, t in enumerate(t_in):
            boxes = box_convert(t["boxes"], box_format, "xywh").tolist()
            crowd = t["iscrowd"].tolist() if "iscrowd" in t else [0] * len(boxes)
            area = t["area"].tolist() if "area" in t else [b[2] * b[3] for b in boxes]
            for b, c, z, a in zip(boxes, t["labels"].tolist(), crowd, area, strict=True):
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": i, "category_id": c, "bbox": b, "area": a,
                                "iscrowd": int(z)})  # fmt: skip
        for i, p in enumerate(p_in):  # the fields COCO.loadRes would add to a results file
            boxes = box_convert(p["boxes"], box_format, "xywh").tolist()
            for b, c, s in zip(boxes, p["labels"].tolist(), p["scores"].tolist(), strict=True):
                dt_anns.append({"id": len(dt_anns) + 1, "image_id": i, "category_id": c, "bbox": b, "score": s,
                                "area": b[2] * b[3], "iscrowd": 0})  # fmt: skip
        gt, dt = COCO(), COCO()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            for coco, anns in ((gt, gt_anns), (dt, dt_anns)):
                coco.dataset = {"images": images, "categories": categories, "annotations": anns}
                coco.createIndex()
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = list(range(len(targets)))
            ev.params.iouThrs, ev.params.recThrs = np.array(IOU_THRESHOLDS), np.array(REC_THRESHOLDS)
            ev.params.maxDets = MAX_DETECTIONS[-1:]
            ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ev.params.areaRngLbl[:1]
            ev.evaluate()
        self._eval = ev
        self._per_image = ev.evalImgs  # class-major: [k * num_images + image]
        self.num_images, self.num_classes = len(targets), len(names)

    def map(self, indices: Sequence[int] | np.ndarray) -> float:
        """mAP of the images at ``indices`` (repeats allowed), pycocotools' ``stats[0]``: -1 when no class
        has ground truth in the resample."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image indices must be in [0, {self.num_images}), got {idx.min()}..{idx.max()}")
        ev, n = self._eval, self.num_images
        # accumulate() reads evalImgs[k * len(imgIds) + position]: lay the resample out that way
        ev.evalImgs = [self._per_image[k * n + i] for k in range(self.num_classes) for i in idx.tolist()]
        ev.params.imgIds = ev._paramsEval.imgIds = idx.tolist()
        with contextlib.redirect_stdout(io.StringIO()):
            ev.accumulate()
        precision = ev.eval["precision"]  # [T, R, K, 1, 1]
        valid = precision[precision > -1]
        return float(valid.mean()) if valid.size else -1.0


# ---------------------------------------------------------------------------------------------- VOC


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
        raise ValueError(f"recall and precision differ in length: {rec.size} vs {prec.size}")
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
class _VocMatches:
    """Per class: detection scores, TP/FP flags (ranked by score), positives count, IoU of each TP."""

    scores: list[np.ndarray]
    tp: list[np.ndarray]
    fp: list[np.ndarray]
    npos: np.ndarray
    tp_iou: list[np.ndarray]


def _voc_match(
    preds: Sequence[dict],
    targets: Sequence[dict],
    num_classes: int,
    iou_threshold: float,
    plus_one: bool,
    box_format: BoxFormat = "xyxy",
) -> _VocMatches:
    """VOC devkit matching: detections in descending score order (stable: image order, then input order)
    take the GT of their class with the highest IoU; IoU >= threshold and GT not taken -> TP, GT already
    taken -> FP (duplicate), GT difficult or crowd -> ignored (neither), IoU below -> FP.

    The greedy order only matters among detections of one image and class, so each (image, class) is matched
    alone and the results are merged with a stable global sort."""
    _check_inputs(preds, targets, num_classes)
    per_class: list[list[tuple]] = [[] for _ in range(num_classes)]
    npos = np.zeros(num_classes, dtype=np.int64)
    for p, t in zip(preds, targets, strict=True):
        d_boxes = box_convert(_as_cpu(p["boxes"], torch.float64).reshape(-1, 4), box_format, "xyxy")
        d_scores = _as_cpu(p["scores"], torch.float64).reshape(-1).numpy()
        d_labels = _as_cpu(p["labels"], torch.int64).reshape(-1).numpy()
        g_boxes = box_convert(_as_cpu(t["boxes"], torch.float64).reshape(-1, 4), box_format, "xyxy")
        g_labels = _as_cpu(t["labels"], torch.int64).reshape(-1).numpy()
        ignored = np.zeros(len(g_labels), dtype=bool)
        for key in ("difficult", "iscrowd"):
            if key in t:
                ignored |= _as_cpu(t[key]).reshape(-1).numpy().astype(bool)
        np.add.at(npos, g_labels[~ignored] - 1, 1)
        if plus_one:  # devkit pixel convention: width = x2 - x1 + 1, same for intersections
            d_boxes = d_boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
            g_boxes = g_boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        for c in np.unique(d_labels):
            d_idx = np.flatnonzero(d_labels == c)
            d_idx = d_idx[np.argsort(-d_scores[d_idx], kind="stable")]
            g_idx = np.flatnonzero(g_labels == c)
            ious = box_iou(d_boxes[d_idx], g_boxes[g_idx]).numpy()  # [D, G]
            taken = np.zeros(len(g_idx), dtype=bool)
            tp, fp, tp_iou = np.zeros(len(d_idx)), np.zeros(len(d_idx)), np.zeros(len(d_idx))
            for r in range(len(d_idx)):
                if len(g_idx) == 0:
                    fp[r] = 1
                    continue
                j = int(np.argmax(ious[r]))  # first maximum, like MATLAB's max
                if ious[r, j] < iou_threshold:
                    fp[r] = 1
                elif ignored[g_idx[j]]:
                    continue
                elif not taken[j]:
                    taken[j], tp[r], tp_iou[r] = True, 1, ious[r, j]
                else:
                    fp[r] = 1
            per_class[c - 1].append((d_scores[d_idx], tp, fp, tp_iou))
    scores, tps, fps, ious_out = [], [], [], []
    for rows in per_class:
        s = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0)
        order = np.argsort(-s, kind="stable")
        tp = np.concatenate([r[1] for r in rows])[order] if rows else np.zeros(0)
        fp = np.concatenate([r[2] for r in rows])[order] if rows else np.zeros(0)
        tp_iou = np.concatenate([r[3] for r in rows])[order] if rows else np.zeros(0)
        scores.append(s[order])
        tps.append(tp)
        fps.append(fp)
        ious_out.append(tp_iou[tp == 1])
    return _VocMatches(scores, tps, fps, npos, ious_out)


@dataclass
class VocResult:
    """Output of :func:`voc_evaluate`. ``ap``: [K] float64, -1 for a class without (non-difficult)
    ground truth; ``map``: mean of ``ap`` over classes with ground truth (-1 if none); ``matched_iou``: per
    class the IoUs of the true-positive detections."""

    ap: np.ndarray
    map: float
    matched_iou: list[np.ndarray]


def _voc_ap_per_class(m: _VocMatches, use_07_metric: bool) -> tuple[np.ndarray, float]:
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
    """Pascal VOC detection AP per class over per-image dicts (module docstring; labels 1..num_classes).

    Matching follows the VOC devkit (IoU >= ``iou_threshold``, greedy by score, duplicates are FP);
    ``difficult`` (and COCO ``iscrowd``) ground truth is ignored: not counted in the positives, and a
    detection whose best match it is counts as neither TP nor FP. ``use_07_metric`` selects VOC2007 11-point
    instead of VOC2010+ all-point AP (:func:`voc_ap`). ``plus_one=True`` uses the devkit's ``x2 - x1 + 1``
    pixel widths; the default measures boxes as continuous coordinates like the rest of the project.
    """
    m = _voc_match(preds, targets, num_classes, iou_threshold, plus_one, box_format)
    ap, mean = _voc_ap_per_class(m, use_07_metric)
    return VocResult(ap, mean, m.tp_iou)


# ---------------------------------------------------------------------------------- full evaluation


def evaluate_detections(
    preds: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str], box_format: BoxFormat = "xyxy",
    coco: CocoResult | None = None,
) -> dict[str, float]:
    """Every metric of :class:`DetectionEvaluator` for per-image dicts, as a flat dict of python floats.

    Keys: :data:`COCO_KEYS`, ``ap/<name>``; ``voc07_ap50``, ``voc10_ap50`` and ``voc07_ap50/<name>``,
    ``voc10_ap50/<name>`` (VOC AP at IoU 0.5, 11-point / all-point); ``iou/<name>`` and ``mean_iou``: mean
    IoU of the detections matched at IoU 0.5 by the VOC rule, per class and over all matched detections
    (-1 where nothing matched). -1 marks an undefined value (no ground truth), as in pycocotools.
    ``coco``: the :func:`coco_evaluate` result of these same inputs when the caller already has it (the
    COCO evaluation is the expensive part), else it is computed here.
    """
    names = list(class_names)
    if coco is None:
        coco = coco_evaluate(preds, targets, names, box_format)
    out = dict(coco.metrics)
    m = _voc_match(preds, targets, len(names), 0.5, plus_one=False, box_format=box_format)
    for year, use_07 in (("07", True), ("10", False)):
        ap, mean = _voc_ap_per_class(m, use_07)
        out[f"voc{year}_ap50"] = mean
        out.update({f"voc{year}_ap50/{n}": float(v) for n, v in zip(names, ap, strict=True)})
    for n, ious in zip(names, m.tp_iou, strict=True):
        out[f"iou/{n}"] = float(ious.mean()) if ious.size else -1.0
    all_ious = np.concatenate(m.tp_iou) if m.tp_iou else np.zeros(0)
    out["mean_iou"] = float(all_ious.mean()) if all_ious.size else -1.0
    return out


def _check_inputs(preds: Sequence[dict], targets: Sequence[dict], num_classes: int) -> None:
    """One prediction and one target dict per image, each with the keys and labels the evaluators read."""
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} prediction dicts but {len(targets)} target dicts")
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        _check_image_dict(p, ("boxes", "scores", "labels"), f"prediction {i}")
        _check_image_dict(t, ("boxes", "labels"), f"target {i}")
    # The label range once for the batch: checked per image, a GPU run would read values back 4x per image.
    by_device: dict[torch.device, list[Tensor]] = {}
    for d in (*preds, *targets):
        if len(d["labels"]):
            by_device.setdefault(d["labels"].device, []).append(d["labels"].reshape(-1))
    if any(_outside(torch.cat(labels), num_classes) for labels in by_device.values()):
        for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
            for where, d in ((f"prediction {i}", p), (f"target {i}", t)):
                if len(d["labels"]) and _outside(d["labels"], num_classes):
                    raise ValueError(f"{where}: labels must lie in 1..{num_classes} (class_names), got "
                                     f"{d['labels'].tolist()}")


def _outside(labels: Tensor, num_classes: int) -> bool:
    return int(labels.min()) < 1 or int(labels.max()) > num_classes


def _check_image_dict(d: dict, required: tuple[str, ...], where: str) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    n = len(d["labels"])
    if d["boxes"].shape not in ((n, 4), (0,)) or (d["boxes"].shape == (0,) and n):
        raise ValueError(
            f"{where}: {n} labels but boxes of shape {tuple(d['boxes'].shape)}, expected [{n}, 4]"
        )
    for key in ("scores", "iscrowd", "area", "difficult"):
        if key in d and len(d[key]) != n:
            raise ValueError(f"{where}: {n} labels but {len(d[key])} {key}")


def _image_id(target: dict) -> int:
    """The target's ``image_id`` if it is a non-negative integer (python, numpy or one-element tensor), else -1:
    an image that is never merged with another."""
    value = target.get("image_id")
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
    return int(value) if ok else -1


class DetectionEvaluator(Metric):
    """Epoch-level detection metrics for a LightningModule: ``update(preds, targets)`` per batch with
    per-image dicts (module docstring), ``compute()`` once per epoch -> :func:`evaluate_detections`' flat
    dict of python floats, ``reset()`` between epochs.

    Inputs are stored unmodified (concatenated per field, with per-image counts), so the states are plain
    tensors that move with ``.to(device)`` and are gathered across DDP processes (``dist_reduce_fx="cat"``,
    which also tolerates processes that saw different numbers of images). Under DDP every process must have
    called ``update`` at least once: ``update([], [])`` adds no image but typed empty states, which is what a
    process whose batches were all unreadable does (torchmetrics' own stand-in for an empty list state has
    the wrong shape and dtype). After a sync the images are ordered by rank.

    An ``image_id`` (target key, a non-negative integer) seen again is scored once, at its first occurrence:
    the litvision DataModules split evaluation data without repeats (``training.distributed.evaluation_sampler``),
    but under DDP a loader of other origin gets Lightning's ``DistributedSampler``, which pads the last processes'
    shares with repeats of the first images so that every process gets as many batches.
    Targets without such an ``image_id`` are never merged.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, class_names: list[str], box_format: BoxFormat = "xyxy", **kwargs) -> None:
        super().__init__(**kwargs)
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
        self.box_format = box_format
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be non-empty and unique, got {class_names!r}")
        self.class_names = list(class_names)
        for name in ("det_boxes", "det_scores", "det_labels", "det_counts", "gt_boxes", "gt_labels",
                     "gt_iscrowd", "gt_area", "gt_difficult", "gt_counts", "image_ids"):  # fmt: skip
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        """Add a batch: ``preds[i]`` and ``targets[i]`` describe the same image."""
        _check_inputs(preds, targets, len(self.class_names))
        dev = self.device

        def cat(dicts: Sequence[dict], key: str, default=None, dtype: torch.dtype | None = None) -> Tensor:
            parts = [d[key].detach().reshape(-1) if key in d else default(d) for d in dicts]
            if not parts:  # no images: typed empties, which DDP gathers like any other process' share
                return torch.zeros(0, device=dev, dtype=dtype or torch.get_default_dtype())
            return torch.cat(parts).to(dev, dtype)

        def box_area(t: dict) -> Tensor:  # pycocotools' w * h when no annotation area is given
            b = box_convert(t["boxes"].detach().reshape(-1, 4), self.box_format, "xywh")
            return b[:, 2] * b[:, 3]

        def zeros(t: dict) -> Tensor:
            return torch.zeros(len(t["labels"]), dtype=torch.int64, device=t["labels"].device)

        self.det_boxes.append(cat(preds, "boxes").reshape(-1, 4))
        self.det_scores.append(cat(preds, "scores"))
        self.det_labels.append(cat(preds, "labels", dtype=torch.int64))
        self.det_counts.append(torch.tensor([len(p["labels"]) for p in preds], dtype=torch.int64, device=dev))
        self.gt_boxes.append(cat(targets, "boxes").reshape(-1, 4))
        self.gt_labels.append(cat(targets, "labels", dtype=torch.int64))
        self.gt_iscrowd.append(cat(targets, "iscrowd", zeros, torch.int64))
        self.gt_difficult.append(cat(targets, "difficult", zeros, torch.int64))  # int: gloo gathers no bool
        self.gt_area.append(cat(targets, "area", box_area, self.gt_boxes[-1].dtype))
        self.gt_counts.append(torch.tensor([len(t["labels"]) for t in targets], dtype=torch.int64, device=dev))
        self.image_ids.append(torch.tensor([_image_id(t) for t in targets], dtype=torch.int64, device=dev))

    @property
    def local_images(self) -> int:
        """Images this process added since the last reset (before any DDP gather)."""
        counts = self.det_counts
        return sum(len(c) for c in counts) if isinstance(counts, list) else len(counts)

    def _images(self) -> tuple[list[dict], list[dict]]:
        counts = self.det_counts  # a list of per-batch tensors, or one tensor after a DDP sync
        if (isinstance(counts, list) and not counts) or (isinstance(counts, Tensor) and counts.numel() == 0):
            return [], []
        s = {k: dim_zero_cat(getattr(self, k)).cpu() for k in self._defaults}
        d_counts, g_counts = s["det_counts"].tolist(), s["gt_counts"].tolist()
        preds = [
            {"boxes": b.reshape(-1, 4), "scores": sc, "labels": lb}
            for b, sc, lb in zip(
                s["det_boxes"].reshape(-1, 4).split(d_counts), s["det_scores"].split(d_counts),
                s["det_labels"].split(d_counts), strict=True,
            )
        ]  # fmt: skip
        targets = [
            {"boxes": b.reshape(-1, 4), "labels": lb, "iscrowd": c, "area": a, "difficult": df.bool()}
            for b, lb, c, a, df in zip(
                s["gt_boxes"].reshape(-1, 4).split(g_counts), s["gt_labels"].split(g_counts),
                s["gt_iscrowd"].split(g_counts), s["gt_area"].split(g_counts), s["gt_difficult"].split(g_counts),
                strict=True,
            )
        ]  # fmt: skip
        seen: set[int] = set()
        keep = []
        for i in s["image_ids"].tolist():
            keep.append(i < 0 or i not in seen)
            seen.add(i)
        if all(keep):
            return preds, targets
        return ([p for p, k in zip(preds, keep, strict=True) if k],
                [t for t, k in zip(targets, keep, strict=True) if k])  # fmt: skip

    def images(self) -> tuple[list[dict], list[dict]]:
        """The accumulated (DDP-gathered) per-image predictions and targets, on CPU, in update order."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self._images()

    def coco_result(self, **overrides) -> CocoResult:
        """:func:`coco_evaluate` on the accumulated images: precision array, PR curves, AP per IoU."""
        return coco_evaluate(*self.images(), self.class_names, self.box_format, **overrides)

    def compute(self) -> dict[str, float]:
        """:func:`evaluate_detections` on the (DDP-gathered) images: a flat dict of python floats."""
        return evaluate_detections(*self._images(), self.class_names, self.box_format)


# ------------------------------------------------------------------------------------- COCO files


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_entry(entry: object, keys: dict[str, str], where: str) -> None:
    """``keys`` maps a key to 'int', 'num', 'str' or 'box' (four finite numbers)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {entry!r}")
    for key, kind in keys.items():
        if key not in entry:
            raise ValueError(f"{where}: missing key {key!r}")
        v = entry[key]
        ok = {
            "int": isinstance(v, int) and not isinstance(v, bool),
            "num": _number(v),
            "str": isinstance(v, str),
            "box": isinstance(v, list) and len(v) == 4 and all(_number(c) for c in v),
        }[kind]
        if not ok:
            raise ValueError(
                f"{where}: {key!r} must be {'four numbers' if kind == 'box' else kind}, got {v!r}"
            )


def _coco_boxes(rows: list[list[float]], box_format: BoxFormat) -> Tensor:
    b = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)  # float64 keeps the file's values exactly
    return b if box_format == "xywh" else box_convert(b, "xywh", "xyxy")


@dataclass
class CocoGroundTruth:
    """A COCO ground-truth file in evaluator form: ``targets[i]`` belongs to ``image_ids[i]`` (ascending,
    like pycocotools); label ``k + 1`` is category ``category_ids[k]`` named ``class_names[k]``; boxes are
    float64 in ``box_format``."""

    path: str
    image_ids: list[int]
    category_ids: list[int]
    class_names: list[str]
    targets: list[dict]
    box_format: BoxFormat = "xyxy"


def load_coco_ground_truth(gt_json: str | os.PathLike, box_format: BoxFormat = "xyxy") -> CocoGroundTruth:
    """Read and validate a COCO instances file; boxes XYWH -> ``box_format`` (float64), category ids -> labels
    1..K (ascending id), ``area`` and ``iscrowd`` from the annotations (``area`` defaults to w*h when absent).
    Every image is kept, with or without annotations."""
    path = os.fspath(gt_json)
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO ground-truth object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or non-list {key!r}")
    for i, img in enumerate(data["images"]):
        _check_entry(img, {"id": "int"}, f"{path}: images[{i}]")
    for i, cat in enumerate(data["categories"]):
        _check_entry(cat, {"id": "int", "name": "str"}, f"{path}: categories[{i}]")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_ids, names = [c["id"] for c in cats], [c["name"] for c in cats]
    if len(set(cat_ids)) != len(cat_ids) or len(set(names)) != len(names):
        raise ValueError(f"{path}: category ids and names must be unique")
    image_ids = sorted({img["id"] for img in data["images"]})
    if len(image_ids) != len(data["images"]):
        raise ValueError(f"{path}: duplicate image ids")
    label_of = {c: k + 1 for k, c in enumerate(cat_ids)}
    per_image: dict[int, list[dict]] = {i: [] for i in image_ids}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        _check_entry(ann, {"image_id": "int", "category_id": "int", "bbox": "box"}, where)
        if ann["image_id"] not in per_image:
            raise ValueError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in label_of:
            raise ValueError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        if "area" in ann:
            _check_entry(ann, {"area": "num"}, where)
        if ann.get("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
        per_image[ann["image_id"]].append(ann)
    targets = []
    for img in image_ids:
        anns = per_image[img]  # file order, as pycocotools' imgToAnns
        targets.append({
            "boxes": _coco_boxes([a["bbox"] for a in anns], box_format),
            "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
                                 dtype=torch.float64),
        })  # fmt: skip
    return CocoGroundTruth(path, image_ids, cat_ids, names, targets, box_format)


def load_coco_predictions(predictions_json: str | os.PathLike, gt: CocoGroundTruth) -> list[dict]:
    """Read a COCO results file (a list of ``{image_id, category_id, bbox: [x, y, w, h], score}``) into one
    prediction dict per ``gt.image_ids`` entry, boxes in ``gt.box_format`` (file order kept within an image;
    images without detections get empty tensors). An image or category missing from the ground truth is an error: pycocotools rejects the
    former and silently drops the latter, which hides label-mapping bugs."""
    path = os.fspath(predictions_json)
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of detections (COCO results format)")
    index = {img: i for i, img in enumerate(gt.image_ids)}
    label_of = {c: k + 1 for k, c in enumerate(gt.category_ids)}
    rows: list[list[dict]] = [[] for _ in gt.image_ids]
    unknown_images: set[int] = set()
    for i, det in enumerate(data):
        where = f"{path}: [{i}]"
        _check_entry(det, {"image_id": "int", "category_id": "int", "bbox": "box", "score": "num"}, where)
        if det["image_id"] not in index:
            unknown_images.add(det["image_id"])
            continue
        if det["category_id"] not in label_of:
            raise ValueError(f"{where}: category_id {det['category_id']} is not a category of {gt.path}")
        rows[index[det["image_id"]]].append(det)
    if unknown_images:
        some = sorted(unknown_images)[:10]
        raise ValueError(
            f"{path}: {len(unknown_images)} image id(s) not in the ground truth {gt.path}: {some}"
        )
    return [
        {
            "boxes": _coco_boxes([d["bbox"] for d in dets], gt.box_format),
            "scores": torch.tensor([float(d["score"]) for d in dets], dtype=torch.float64),
            "labels": torch.tensor([label_of[d["category_id"]] for d in dets], dtype=torch.int64),
        }
        for dets in rows
    ]


def write_metrics_json(metrics: dict[str, float], path: str | os.PathLike) -> None:
    """Write ``metrics`` as a flat JSON object, atomically (``training.saving.atomic_write``)."""
    atomic_write_bytes(path, (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))


def evaluate(
    gt_json: str | os.PathLike, predictions_json: str | os.PathLike, out: str | os.PathLike | None = None
) -> dict[str, float]:
    """Score a COCO results file against a COCO ground-truth file through :class:`DetectionEvaluator`.

    Returns (and with ``out`` writes atomically as flat JSON) :func:`evaluate_detections`' dict; per-class
    keys use the category names of ``gt_json``. The COCO numbers equal pycocotools ``COCOeval`` on the same
    files (module docstring). Raises ``ValueError`` naming the file for malformed input.

    The evaluator is fed the files' XYWH boxes unchanged (``box_format="xywh"``): a round trip through XYXY
    turns ``w`` into ``(x + w) - x``, which can differ in the last bit and move a detection of area exactly
    32**2 or 96**2 to another size bucket, or an IoU sitting exactly on a threshold across it.
    """
    gt = load_coco_ground_truth(gt_json, box_format="xywh")
    preds = load_coco_predictions(predictions_json, gt)
    evaluator = DetectionEvaluator(gt.class_names, box_format="xywh")
    if gt.image_ids:
        evaluator.update(preds, gt.targets)
        metrics = evaluator.compute()
    else:
        metrics = evaluate_detections([], [], gt.class_names)
    if out is not None:
        write_metrics_json(metrics, out)
    return metrics


# ---------------------------------------------------------------------------------------- display

_DESCRIPTIONS = {
    "map": "AP  @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "map_50": "AP  @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "map_75": "AP  @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "map_small": "AP  @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "map_medium": "AP  @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "map_large": "AP  @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "mar_1": "AR  @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "mar_10": "AR  @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "mar_100": "AR  @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "mar_small": "AR  @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "mar_medium": "AR  @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "mar_large": "AR  @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "voc07_ap50": "Pascal VOC2007 11-point AP @ IoU=0.50",
    "voc10_ap50": "Pascal VOC2010+ all-point AP @ IoU=0.50",
    "mean_iou": "mean IoU of detections matched @ IoU=0.50",
}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or v < 0 else f"{v:.4f}"  # -1: undefined (no ground truth)


def format_metrics_table(metrics: dict[str, float], title: str = "Detection metrics") -> Table:
    """Overall metrics (the 12 COCO stats, VOC AP50, mean IoU) as a rich Table; 'n/a' for -1."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("meaning")
    table.add_column("value", justify="right")
    for key, text in _DESCRIPTIONS.items():
        if key in metrics:
            table.add_row(key, text, _fmt(metrics[key]))
    return table


def format_class_table(metrics: dict[str, float], title: str = "Per class") -> Table:
    """Per-class COCO AP, VOC AP50 (2007, 2010+) and mean matched IoU as a rich Table; 'n/a' for -1."""
    table = Table(title=title)
    for col in ("class", "AP", "VOC07 AP50", "VOC10 AP50", "mean IoU"):
        table.add_column(col, justify="left" if col == "class" else "right")
    names = [k[3:] for k in metrics if k.startswith("ap/")]
    for name in names:
        table.add_row(
            name, *(_fmt(metrics.get(f"{p}/{name}")) for p in ("ap", "voc07_ap50", "voc10_ap50", "iou"))
        )
    return table


def evaluate_command(gt: str, predictions: str, out: str | None = None) -> dict:
    """Score a COCO results file against a COCO ground-truth file and print the metrics.

    Args:
        gt: COCO ground-truth annotations (instances_*.json).
        predictions: COCO results file: [{image_id, category_id, bbox [x, y, w, h], score}, ...].
        out: optional path for a flat JSON of the metrics (torchmetrics key names, per-class entries).
    """
    from rich.console import Console

    metrics = evaluate(gt, predictions, out=out)
    console = Console()
    console.print(format_metrics_table(metrics))
    console.print(format_class_table(metrics))
    if out:
        console.print(f"metrics written to {out}")
    return metrics
