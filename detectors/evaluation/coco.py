"""COCO bbox metrics configured to reproduce pycocotools ``COCOeval(gt, dt, "bbox")``.

:func:`coco_evaluate` runs faster-coco-eval on per-image dicts (``detectors.evaluation.inputs``), fed as
arrays (``evaluation.coco_arrays``), and returns the 12 stats, per-class AP and the precision array
(:class:`CocoResult`); :func:`coco_map_metric` sets up torchmetrics ``MeanAveragePrecision`` on the same
backend the same way, which ``coco_evaluate(..., **overrides)`` uses for torchmetrics' own options. The
tests compare all 12 stats and per-class AP to pycocotools to 1e-6. What that takes:

- IoU and recall thresholds are float64 ``numpy.linspace`` values, as in pycocotools; torchmetrics' defaults
  are float32 ``torch.linspace`` values (0.55 becomes 0.550000011920929), which flips matches whose IoU sits
  between the two and moves the 101 recall sampling points.
- ``area`` is forwarded so small/medium/large use the annotation area (segmentation area for COCO), not the
  box area. torchmetrics only uses an area that is ``> 0`` and silently replaces 0 by the box area, so on
  that path an annotation area of exactly 0 is passed as the smallest positive float (same
  small/medium/large decision); the array path passes every area as it is.
- ``iscrowd`` is forwarded: crowd regions are ignored GT that absorb detections, as in pycocotools.
- Nothing is truncated or filtered here. pycocotools applies ``maxDets=100`` per image AND per class (the
  top-100 detections of each class in each image), so an image may contribute more than 100 detections in
  total; torchmetrics' "more than 100 detections" warning is therefore switched off.
- Images are evaluated in the order given; ``detectors.evaluation.evaluate`` sorts them by image id like
  pycocotools does, because equal scores in different images are ranked by image order.
- Classes with no (non-crowd) ground truth get AP/AR ``-1`` and are left out of every mean, as in pycocotools.
  That includes classes that appear only in predictions.
- Per-class AP (``ap/<name>``) is computed from the precision array of the one evaluation, exactly as
  pycocotools' ``summarize()`` does for ``params.catIds = [class]``; torchmetrics' ``class_metrics=True``
  would give the same numbers (in float32, like all its stats) by re-running the evaluation once per class.
- pycocotools works on XYWH and takes a detection's area as ``w * h``; XYXY input is converted to XYWH
  in its own dtype (as torchmetrics does), so it stands for the results file that holds ``w = x2 - x1``.
  ``detectors.evaluation.evaluate`` therefore hands the file's XYWH boxes over unchanged
  (``box_format="xywh"``) rather than round-tripping them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

from training.errors import BadValueError

from .coco_arrays import faster_coco_eval
from .inputs import BoxFormat, as_cpu, check_inputs

IOU_THRESHOLDS: list[float] = np.linspace(0.5, 0.95, 10).tolist()  # float64, exactly pycocotools' iouThrs
REC_THRESHOLDS: list[float] = np.linspace(0.0, 1.0, 101).tolist()  # pycocotools' recThrs
MAX_DETECTIONS: list[int] = [1, 10, 100]
# pycocotools' stats[0..11] in order, under torchmetrics' names.
COCO_KEYS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip
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


def _mean_valid(p: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """Mean over ``axis`` of the entries > -1 (pycocotools' ``s[s > -1].mean()``), -1 where there are none."""
    valid = p > -1
    count = valid.sum(axis=axis)
    return np.where(count > 0, np.where(valid, p, 0.0).sum(axis=axis) / np.maximum(count, 1), -1.0)


@dataclass
class CocoResult:
    """Output of :func:`coco_evaluate`.

    ``metrics``: the 12 COCO stats under :data:`COCO_KEYS` plus ``ap/<class name>`` (python floats, -1 where
    pycocotools gives -1). ``precision``: float64 [T, R, K, A, M] (IoU thresholds x recall thresholds x
    classes x areas (all, small, medium, large) x maxDets), -1 where a class has no ground truth; class
    index ``k`` is label ``k + 1``. ``recall``: float64 [T, K, A, M].
    """

    metrics: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    iou_thresholds: list[float]
    rec_thresholds: list[float]
    class_names: list[str]

    def ap_per_iou(self) -> np.ndarray:
        """AP per IoU threshold and class, float64 [T, K] (area all, largest maxDets); -1 without ground
        truth.

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
            raise BadValueError(f"IoU threshold {iou_threshold} is not one of {self.iou_thresholds}")
        return np.asarray(self.rec_thresholds), self.precision[t, :, class_index, 0, -1].copy()


def metric_inputs(preds: Sequence[dict], targets: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The keys torchmetrics reads, on CPU; ``area`` of 0 made representable (see module docstring)."""
    p_out, t_out = [], []
    for p in preds:
        p_out.append(
            {
                "boxes": as_cpu(p["boxes"]).reshape(-1, 4),
                "scores": as_cpu(p["scores"]).reshape(-1),
                "labels": as_cpu(p["labels"], torch.int64).reshape(-1),
            }
        )
    for t in targets:
        boxes = as_cpu(t["boxes"]).reshape(-1, 4)
        item = {"boxes": boxes, "labels": as_cpu(t["labels"], torch.int64).reshape(-1)}
        if "iscrowd" in t:
            item["iscrowd"] = as_cpu(t["iscrowd"], torch.int64).reshape(-1)
        if "area" in t:
            area = as_cpu(t["area"], torch.float64).reshape(-1)
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
    """COCO bbox evaluation of per-image dicts (``evaluation.inputs``): the 12 stats, per-class AP and the
    precision and recall arrays, from one faster-coco-eval evaluation fed arrays directly
    (``evaluation.coco_arrays``, the thresholds of :func:`coco_map_metric`).

    ``box_format="xywh"`` takes COCO's boxes as they are (module docstring, last point). ``overrides`` run
    the evaluation through torchmetrics' ``MeanAveragePrecision`` instead, set up by
    ``coco_map_metric(**overrides)`` (``extended_summary=False``: no arrays, no per-class AP;
    ``class_metrics=True`` with it: torchmetrics' own per-class AP, one evaluation per class). Nothing here
    syncs across processes: callers pass already-gathered lists.
    """
    names = list(class_names)
    check_inputs(preds, targets, len(names))
    if overrides:
        return _torchmetrics_evaluate(preds, targets, names, box_format, overrides)
    T, R, K, M = len(IOU_THRESHOLDS), len(REC_THRESHOLDS), len(names), len(MAX_DETECTIONS)
    if len(preds) > 0:
        stats, precision, recall = faster_coco_eval(
            preds, targets, K, box_format, IOU_THRESHOLDS, REC_THRESHOLDS, MAX_DETECTIONS
        )
    else:  # nothing to evaluate: pycocotools would have no images
        stats, precision, recall = -np.ones(12), -np.ones((T, R, K, 4, M)), -np.ones((T, K, 4, M))
    metrics = dict(zip(COCO_KEYS, stats.tolist(), strict=True))
    result = CocoResult(metrics, precision, recall, list(IOU_THRESHOLDS), list(REC_THRESHOLDS), names)
    result.metrics.update({f"ap/{n}": v for n, v in zip(names, result.class_ap().tolist(), strict=True)})
    return result


def _torchmetrics_evaluate(
    preds: Sequence[dict], targets: Sequence[dict], names: list[str], box_format: BoxFormat, overrides: dict
) -> CocoResult:
    """:func:`coco_evaluate` through ``coco_map_metric(box_format=box_format, **overrides)``."""
    overrides = {"extended_summary": True, "class_metrics": False, "sync_on_compute": False, **overrides}
    metric = coco_map_metric(box_format=box_format, **overrides)
    T, R, K = len(metric.iou_thresholds), len(metric.rec_thresholds), len(names)
    M = len(metric.max_detection_thresholds)
    precision, recall = -np.ones((T, R, K, 4, M)), -np.ones((T, K, 4, M))
    per_class: dict[str, float] | None = None
    if len(preds) > 0:
        metric.update(*metric_inputs(preds, targets))
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
    else:
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
